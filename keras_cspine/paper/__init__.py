"""The paper's results end to end: :mod:`~keras_cspine.paper.reproduce` (Tables 1 and 3, one
command per table) and :mod:`~keras_cspine.paper.demo` (the whole pipeline on synthetic data)."""
