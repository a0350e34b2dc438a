"""The compose benchmark: a GenEval analog on generated scenes of coloured digits, and the flux2-tiny-compose model.

world.py (scenes), grammar.py (prompts, held-out combinations), model.py (the model's text, latents, sampler),
judge.py (the judge and its answers), benchmark.py (`bonsai-quant eval --benchmark compose`).
"""
