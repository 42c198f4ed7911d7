"""What one validation pass carries: the errors found so far, and what items are checked against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from crmhooks.config.files import FileChecks
from crmhooks.config.problems import Problems
from crmhooks.config.references import References
from crmhooks.modules import ModuleCatalog
from crmhooks.settings import Limits


@dataclass(slots=True)
class Context:
    """The checks' shared state for one config (or one organisation document)."""

    problems: Problems
    references: References
    files: FileChecks
    catalog: ModuleCatalog = field(default_factory=ModuleCatalog)
    limits: Limits = field(default_factory=Limits)
    org_ids: Mapping[str, object] = field(default_factory=dict)  # known organisations
    # The organisation of a config-topic document: its items belong to it.
    document_org: str | None = None
