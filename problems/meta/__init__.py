"""Meta-learning over task distributions: few-shot sinusoid regression (Finn et al. 2017) and
N-way K-shot classification on the digits bundled with scikit-learn, with presets for MAML,
first-order MAML, ANIL, Meta-SGD and iMAML (see README.md and docs/howto/meta-learning.md)."""
