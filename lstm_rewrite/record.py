"""The rewrite record's former home: its names now live in `lstm_rewrite.rewrite.record`.

Kept so that the stages that read records (capture, audit, loading, beam, the CLI, the backends'
traced model class) import it as before; new code imports `lstm_rewrite.rewrite.record`.
"""

from .rewrite.record import (
    BACKWARD_ALIGNED,
    FORWARD,
    GO_BACKWARDS,
    RECORD_FORMAT,
    TIME_ORDERS,
    CarriesRecord,
    ExposedOutput,
    RewriteRecord,
    record_of,
    recover_record,
)

__all__ = ["BACKWARD_ALIGNED", "FORWARD", "GO_BACKWARDS", "RECORD_FORMAT", "TIME_ORDERS", "CarriesRecord",
           "ExposedOutput", "RewriteRecord", "record_of", "recover_record"]
