"""`minsnr compare`: weightings raced on common random numbers over several seeds, scored against steps,
with a speed-up interval and a verdict per run (section 4.2, figures 1, 5 and 6).

    presets     compare settings, the run matrix (target x weighting), the per-target baselines, seeds
    runner      one resumable training run per (seed, target, weighting) as a pinned subprocess; compare.json
    worker      the subprocess: train with the evaluation hook, then the final per-bin x0 MSE
    classifier  the score: fid_cls (given or auto classifier), Inception FID, or bits/dim
    sanity      the score's floor, ceiling and noise, and warnings
    verdict     smoothing, speed-ups at three quality levels, intervals over seeds, verdicts (pure)
    report      the report in compare.json and the terminal tables
    figure      compare.png
    cli         the verb
"""
