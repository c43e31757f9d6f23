"""Feature banks (features of a checkpoint on a dataset, stored as .npy files) and what we ask
of them, one job per file:

    files.py       the bank folder: write, open with checks, compatibility
    runs.py        a run folder: config, checkpoint, model, splits, a layer's features
    extract.py     resumable sharded extraction of a run's bank (trainer/extraction.py)
    search.py      faiss indexes, leave-one-out search, kNN accuracy (trainer/knn.py's vote)
    analysis.py    neighbours, tail-to-head leakage, centroids, classifier weight norms
    plots.py       weight-norm and neighbour-grid figures
    label_pool.py  pseudo-labels of a run's pool from any checkpoint (tools/pseudo_label.py)
"""
