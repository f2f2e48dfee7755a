"""The per-sample column names and the markers that mean "no value" in them: shared by the math
(`scoring`) and the stores that keep its inputs and results (`formats`), defined once here, below
both, so that writers, readers and the selection agree. Standard library only."""

# Markers of "no value" in the stores (also the arrays' fill values).
STAT_MISSING = float("nan")  # a float statistic or score not recorded / not computable
CORRECT_MISSING = 255  # `correct` (uint8) not recorded
LABEL_MISSING = -1  # no label: never recorded, a skipped sample, or unknown
NO_GROUP = -1  # scores.zarr `sel_group`: the row cannot be selected

LABEL = "label"  # the int32 (N,) label array of stats.zarr and scores.zarr (LABEL_MISSING: unknown)
