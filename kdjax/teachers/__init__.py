"""Where a teacher's outputs come from: one `Teacher` object, several sources, one chooser.

    teacher.py         the `Teacher` the steps call: outputs for a batch (read or computed)
    keys.py            batch keys of outputs computed ahead of the step; top-k -> logits
    live.py            trained checkpoints and ensembles (dtype, BatchNorm folding)
    disk_cache.py      outputs cached on disk: writer and reader (FKD-style replay)
    process_logits.py  a language model's logits computed once per process
    choose.py          the source a run (or a hand-built step) gets from the method's needs

A method declares what it needs (`kdjax.methods.base.TeacherNeeds`); nothing here knows a
method by name. Submodules are imported where used (this file imports nothing), so that
`kdjax.methods` can read `keys` without pulling in checkpoints or data.
"""
