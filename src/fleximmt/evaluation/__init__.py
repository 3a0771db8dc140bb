"""Judging transfers: the paper's metrics (``metrics``), object masks from words and their propagation
(``segment``), the evaluation runner (``evaluate``) and videos people can look at (``video``)."""
