"""The rewrite record's former home: its names now live in `lstm_rewrite.rewrite.record`.

Kept so that the stages that read records (capture, audit, loading, the CLI, the backends' traced
model class) import it as before; new code imports `lstm_rewrite.rewrite.record`.
"""

from .rewrite.record import (  # noqa: F401 - re-exported
    BACKWARD_ALIGNED,
    FORWARD,
    GO_BACKWARDS,
    RECORD_FORMAT,
    TIME_ORDERS,
    CarriesRecord,
    ExposedOutput,
    RewriteRecord,
    recover_record,
    record_of,
)
