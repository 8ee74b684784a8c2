"""Studies: sweeps over config keys and compute-optimal scaling laws, resumable as one command.

grid.py     --grid KEY=V1,V2 → points (overrides) and their run names
sweep.py    one run directory per point: lock, skip finished, resume interrupted, --parallel, --slurm
scaling.py  model sizes from one size parameter, steps from a FLOP budget
fit.py      IsoFLOP parabolas, power laws, the parametric L(N, D) (Huber on log loss), bootstrap intervals
report.py   tables and PNG plots of a sweep or a study
commands.py `lmjax sweep` and `lmjax study`
"""
