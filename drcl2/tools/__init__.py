"""drcl2's command lines, run as ``python -m drcl2.tools.<name>``."""
