"""Membership inference as pure computation (issue 22): strong per-example attacks and their statistics.

No I/O: callers pass the target model's and the reference models' per-example confidences."""
