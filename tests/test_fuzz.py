"""Property-based fuzzing: random functional models (tests/fuzz_models.py) on both flavours.

Each generated model must pass `fuzz_models.check_spec`: the traced model reproduces the original
outputs, every exposed state equals the NumPy oracle, the input model is untouched, and the traced
model saves to .keras and reloads to the same outputs.

Profiles (environment variables):

- ``FUZZ_EXAMPLES``: examples per flavour (default 6: the small profile of ``make test``;
  ``make fuzz`` runs 500).
- ``FUZZ_SEED``: explore with this seed instead of the fixed, derandomized sequence of examples.
- ``FUZZ_SHRINK=1``: shrink a failing example (minutes per failure: every try builds a model).

A failure prints the spec; paste it into tests/test_regressions.py as a named test.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

import fuzz_models

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
SEED = os.environ.get("FUZZ_SEED")
SHRINK = os.environ.get("FUZZ_SHRINK") == "1"

profile = settings(
    max_examples=EXAMPLES,
    deadline=None,  # building and tracing a model takes seconds, and the first example compiles
    derandomize=SEED is None,  # the same examples on every run, so that CI is stable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else []),
)


def _fuzz(flavour):
    @profile
    @given(spec=fuzz_models.model_specs(flavour))
    def check(spec):
        fuzz_models.check_spec(spec, flavour)

    if SEED is not None:
        check = hypothesis_seed(int(SEED))(check)
    return check


@pytest.mark.parametrize("flavour", ["keras3", "tfkeras"])
def test_random_models(flavour):
    _fuzz(flavour)()
