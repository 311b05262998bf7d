"""Learning around the one model: heads over its hidden states, fit from labelled rows.

``heads`` (linear heads: apply in numpy, fit with scikit-learn), ``fit`` (methods compared by
cross-validation), ``data`` (training rows, checked), ``augment`` (injected copies for
robustness), ``artifacts`` (safetensors files tied to a model's SHA-256). Nothing here runs the
model: the API computes the features with engine jobs and hands them in.
"""
