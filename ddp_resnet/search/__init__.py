"""Hyper-parameter search with Optuna: ``python -m ddp_resnet.search`` (``cli``), the study on disk (``study``), the
space (``space``), where trials run (``launch``), the loop (``driver``), what it writes (``results``), and the
trial side (``trial``, ``reporter``: what ``ddp_resnet.train`` installs when ``train.trial`` is set).

Importing this package imports neither Optuna nor torch; the modules that need Optuna import it when called.
"""
