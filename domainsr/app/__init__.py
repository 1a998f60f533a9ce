"""The application layer that the flows (``flows/``) and the CLI call: runs (plan, run key, skip),
enhance (one item path; streaming and guided are strategies, not copies) and audits, without
Prefect (flows hold no image logic).

* :mod:`~domainsr.app.progress`: the progress bus (:func:`listen`, :func:`report`);
* :mod:`~domainsr.app.models`: which model a reference names, its identity, the model built for an image;
* :mod:`~domainsr.app.runs`: :class:`RunSpec`, :func:`plan_run` and the run key, skipping, results;
* :mod:`~domainsr.app.inputs`: which bands of an item are enhanced;
* :mod:`~domainsr.app.enhance`: :func:`enhance_item` and its strategies (in memory, guided, streamed);
* :mod:`~domainsr.app.audits`: the audit of an enhanced item, the held-out and the output audits;
* :mod:`~domainsr.app.degradation`: ``--degradation``: the LR-consistency operator of an audit and why;
* :mod:`~domainsr.app.audit_items`: what ``domainsr audit --sr --lr`` audits (one pair, or a batch).

Dependency direction (``tests/test_architecture.py``): flows, cli -> app -> stores, audit, train,
engine -> models, degrade, io -> image, config; never the other way.
"""
from domainsr.app.audits import heldout_audit, output_audit
from domainsr.app.enhance import enhance_item
from domainsr.app.models import find_checkpoint, load_model, model_identity, parse_scale
from domainsr.app.progress import listen, report
from domainsr.app.runs import ItemResult, RunSpec, config_from_model, plan_run, split_done, summarize

__all__ = [
    "ItemResult",
    "RunSpec",
    "config_from_model",
    "enhance_item",
    "find_checkpoint",
    "heldout_audit",
    "listen",
    "load_model",
    "model_identity",
    "output_audit",
    "parse_scale",
    "plan_run",
    "report",
    "split_done",
    "summarize",
]
