"""Membership inference as computation (issue 22 parts 2–3): a strong per-example attack and its statistics.

- ``attack``: RMIA (default) and offline LiRA scores from the target's and reference models' true-label
  probabilities; ``membership_report`` puts RMIA (AUC, TPR at 1% / 0.1% FPR, with intervals) beside the
  loss-based AUC. RMIA because two shared CPU cores train 4–8 reference models, and RMIA is strong with
  that few, where LiRA's per-example Gaussian fits need dozens (offline LiRA is kept for comparison).
- ``metrics``: exact AUC by ranks, TPR at a fixed FPR, Hanley–McNeil and bootstrap intervals (numpy only).
- ``reference``: reference models trained on random halves with the caller's recipe, cached on disk by
  recipe key, with the indices each saw and its training seconds (the only module here that does I/O).
- ``forget_sets``: forget sets where membership is real — mislabeled canaries and the most atypical members.
"""
