"""Mined hard negatives (spec.hardNegatives): which documents to mine (``negatives``, pure) and
the mining pass with its cache (``mine``)."""
