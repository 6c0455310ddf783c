"""qdcompile.passes — torch.fx passes and the ``qdiff`` torch.compile backend."""
