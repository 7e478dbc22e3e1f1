"""What the tuner's stored choices look like to the tests (shared by test_bench and
test_linear_ops)."""


def grid(params):
    """Launch constants but those a tuner candidate may leave to the stage defaults
    (MBLOCK, UNROLL: written out by the tuner where the default has them) or the second
    pass refines (UNROLL)."""
    return {k: v for k, v in params.items() if k not in ("UNROLL", "MBLOCK")}


def looked_up(entry):
    """What a lookup returns for a stored tuning entry: ``None`` when the tuner kept the
    default it was tuned against (the op's own default applies), else the choice."""
    return None if entry["params"] == entry["default"] else entry["params"]
