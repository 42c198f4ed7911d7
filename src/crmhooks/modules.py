"""CRM modules: which exist, which may carry webhooks, and their template namespaces."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Plural (canonical) name → singular name, as the CRM names them. The seed lists
# "the main CRM modules, activities and tasks" as supported.
STANDARD_MODULES: Mapping[str, str] = {
    "Leads": "Lead",
    "Accounts": "Account",
    "Contacts": "Contact",
    "Potentials": "Potential",
    "Campaigns": "Campaign",
    "Cases": "Case",
    "Solutions": "Solution",
    "Products": "Product",
    "Vendors": "Vendor",
    "Price Books": "Price Book",
    "Quotes": "Quote",
    "Sales Orders": "Sales Order",
    "Purchase Orders": "Purchase Order",
    "Invoices": "Invoice",
    "Events": "Event",
    "Tasks": "Task",
}

# Other names a module is known by (the newer CRM calls Potentials "Deals").
MODULE_ALIASES: Mapping[str, str] = {"Deals": "Potentials", "Deal": "Potentials"}

# The seed: "Calls (call logs) and Notes cannot have webhooks"; their events are ignored.
UNSUPPORTED_MODULES: frozenset[str] = frozenset({"Calls", "Notes"})

USER_NAMESPACES: frozenset[str] = frozenset({"User", "Users"})
ORG_NAMESPACES: frozenset[str] = frozenset({"Organization", "Org"})


class ModuleCatalog:
    """Names of the modules known to one configuration (standard + custom)."""

    __slots__ = ("_canonical",)

    def __init__(self, custom_modules: Iterable[str] = ()) -> None:
        canonical: dict[str, str] = {}
        for plural, singular in STANDARD_MODULES.items():
            canonical[plural] = plural
            canonical[singular] = plural
        for alias, plural in MODULE_ALIASES.items():
            canonical[alias] = plural
        for name in custom_modules:
            canonical.setdefault(name, name)
        self._canonical = canonical

    def canonical(self, name: str) -> str | None:
        """The canonical (plural) name of a module, or None when unknown."""
        return self._canonical.get(name)

    def is_supported(self, name: str) -> bool:
        return name in self._canonical and name not in UNSUPPORTED_MODULES

    def names_of(self, module: str) -> frozenset[str]:
        """Every name that denotes ``module`` (a canonical name) in a placeholder."""
        return frozenset(n for n, c in self._canonical.items() if c == module)

    def __repr__(self) -> str:
        return f"ModuleCatalog({len(set(self._canonical.values()))} modules)"
