"""pyserve: make trained models smaller and faster, serve them over KServe v2 gRPC, roll them out safely.

Importing :mod:`pyserve` is cheap: it pulls in neither torch, grpc nor the compressor. ``pyserve.load``
imports the artifact reader (and torch) on first use.
"""

from pyserve._version import __version__

__all__ = ["__version__", "load"]


def load(path):
    """Load a ``.pyserve`` artifact as a runnable ``torch.nn.Module`` with decoded fp32 weights.

    Parameters
    ----------
    path : str or os.PathLike
        Artifact written by ``pyserve compress`` or :func:`pyserve.artifact.save`.

    Returns
    -------
    torch.nn.Module
        The captured graph (torch.export) with the decoded weights; inputs and outputs follow the
        artifact's signature (``pyserve.artifact.read_manifest(path)``). When the artifact holds a
        tokenizer (a sentence model written with ``text=``, docs/artifact.md "Text input"), a
        ``TextModel`` that also takes sentences: ``pyserve.load(p)(["a sentence", ...])``.

    Raises
    ------
    pyserve.artifact.ArtifactError
        (a ``ValueError``) when the file is missing, truncated, of an unknown format version, or a
        blob fails its SHA-256 checksum.
    """
    from pyserve.artifact import load_module

    return load_module(path)
