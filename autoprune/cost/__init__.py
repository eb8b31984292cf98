"""What a policy costs: budgets (:mod:`~autoprune.cost.budget`), closed-form and counted FLOPs and
parameters (:mod:`~autoprune.cost.flops`), and measured latency on a runtime
(:mod:`~autoprune.cost.latency`, :mod:`~autoprune.cost.runtimes`)."""
