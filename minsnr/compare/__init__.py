"""`minsnr compare`: weightings raced on common random numbers, scored against steps (section 4.2,
figures 1, 5 and 6).

    presets   compare settings, the run matrix (target x weighting), the per-target baselines
    runner    one resumable training run per (target, weighting) as a pinned subprocess; compare.json
    worker    the subprocess: train with the fid_cls hook, then the final per-bin x0 MSE
    classifier  the fid_cls classifier: given, Inception, or trained on the data and cached
    report    speed-up arithmetic, the terminal table, compare.png
    cli       the verb
"""
