"""Multi-block bilevel problems: many lower problems (tasks) under one upper level, the setting of
BSVRB (Hu et al. 2023, "Blockwise Stochastic Variance-Reduced Methods with Parallel Speedup for
Multi-Block Bilevel Optimization", ICML). Each task is one block of the lower level
(``levels.<lower>.blocks``); k of m blocks are drawn per step.

* :mod:`~problems.multiblock.hyperrep`: a shared linear encoder upstairs, one ridge head per task
  downstairs (synthetic regression tasks with a common low-rank representation);
* :mod:`~problems.multiblock.l2`: one L2 strength per task upstairs, a logistic-regression model
  per task downstairs (binary digit tasks from the bundled digits set);
* :mod:`~problems.multiblock.compare`: BSVRB, the plain blockwise method and full-batch implicit
  differentiation, upper loss against block-solves over seeds (docs/howto/trees-and-blocks.md)."""
