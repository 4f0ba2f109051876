"""The highway-env driving simulator behind `mose simulate` and closed-loop evaluation.

corpus (the `mose simulate` command: a ScenePool of real and synthetic scenes), episode (one episode's plan,
rollout and cut into scenes), world (make an environment, tick it, observe its state: shared with
eval/closed_loop.py), drivers (ego and traffic behaviour, scripted events, weather), export (highway-env state
in ScenePool terms), render (top-down images), safety (near-miss measures), command (the driving command),
annotate (question-answer annotations), stats (real-vs-synthetic distribution distance).
"""
