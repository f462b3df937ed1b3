"""The benchmark: the project's record of its numbers (``unlearnd bench``, ``make bench``)."""
