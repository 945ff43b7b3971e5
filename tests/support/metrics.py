"""Reading metrics, where a missing sample FAILS rather than reading as zero.

A sample that is not exported at all is a different fact from a sample that is 0: a renamed
family or a label value that never gets a child would otherwise pass every ``== 0`` check.

* :func:`sample` reads one value from a registry in this process;
* :func:`scrape` fetches ``/metrics`` over HTTP and returns a :class:`Scrape` to read values,
  families and label values from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of sample ``name{labels}``; an AssertionError when it is not exported."""
    value = registry.get_sample_value(name, labels)
    if value is None:
        present = sorted({s.name for metric in registry.collect() for s in metric.samples
                          if s.name.startswith(name.rsplit("_", 1)[0])})
        raise AssertionError(f"metric sample {name}{labels or ''} is missing (similar: {present})")
    return value


@dataclass
class Scrape:
    """One parsed ``/metrics`` text."""

    text: str
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)  # family name -> type
    sample_labels: dict[str, list[Mapping[str, str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls(text)
        for family in text_string_to_metric_families(text):
            scrape.families[family.name] = family.type
            for s in family.samples:
                scrape.samples[(s.name, frozenset(s.labels.items()))] = s.value
                scrape.sample_labels.setdefault(s.name, []).append(dict(s.labels))
        return scrape

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def value(self, name: str, **labels: str) -> float:
        """The value of sample ``name{labels}`` (exactly those labels); fails when missing."""
        try:
            return self.samples[(name, frozenset(labels.items()))]
        except KeyError:
            seen = self.sample_labels.get(name)
            raise AssertionError(f"metric sample {name}{labels or ''} is missing; "
                                 f"exported label sets: {seen}") from None

    def label_values(self, family: str, label: str) -> set[str]:
        """Every value ``label`` takes on the samples of ``family`` (any sample suffix)."""
        return {labels[label] for name, label_sets in self.sample_labels.items()
                if name == family or name.startswith(family + "_") for labels in label_sets if label in labels}


async def scrape(admin_url: str) -> Scrape:
    """GET ``/metrics`` from an admin listener and parse it."""
    async with (aiohttp.ClientSession(trust_env=False) as http,
                http.get(admin_url + "/metrics") as resp):
        assert resp.status == 200, resp.status
        return Scrape.parse(await resp.text())
