"""anygen's benchmark suite: speed and parity against a reference run in the same process.

    python -m benchmarks list
    python -m benchmarks run [ldm parti fusion train decoders | all] [--size tiny|real]
        [--device cuda] [--dtype fp16|bf16|fp32] [--variant eager|compiled|all] [--json OUT]

``--size tiny`` (the default on a CPU) runs every benchmark on tiny configs in a few
minutes; ``--size real`` (the default on CUDA) on SD-1.5 / ~1 B-parameter configs with
random weights. ``benchmarks/gpu_plan.sh`` runs all of it on one GPU. The scripts beside
this file (``ldm_vs_diffusers.py``, ``parti_decoding.py``, ``fusion_decoding.py``,
``render_speed.py``, ``eval_speed.py``) also run on their own as files.
"""
