"""Strict validation of rendered manifests, custom resources included.

kubernetes-validate knows the built-in kinds of each Kubernetes version, not CRDs. For the
custom kinds the chart renders, ``tests/deploy/schemas/`` keeps the ``openAPIV3Schema`` of the
released CRDs (each file names its source: repository, tag, path; only descriptions removed):
Gateway API HTTPRoute v1 (standard and experimental channels) and Prometheus Operator
PrometheusRule / ServiceMonitor v1. They are validated with jsonschema after one change that
makes them strict like kubernetes-validate's strict mode: an object schema with ``properties``
admits no other fields (the API server would drop them, or refuse them under strict field
validation). What jsonschema cannot check is left out: the CEL rules
(``x-kubernetes-validations``) and ObjectMeta beyond a well-formed name.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate

from tests.support.config import REPOSITORY
from tests.support.helm import KUBERNETES_VERSION, Manifest

SCHEMAS = REPOSITORY / "tests" / "deploy" / "schemas"
# (apiVersion, kind, channel) -> schema file; the channel matters for Gateway API only.
CUSTOM_KINDS = {
    ("gateway.networking.k8s.io/v1", "HTTPRoute", "standard"): "httproute-v1-standard.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute", "experimental"): "httproute-v1-experimental.json",
    ("monitoring.coreos.com/v1", "PrometheusRule", "standard"): "prometheusrule-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor", "standard"): "servicemonitor-v1.json",
}
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        strict = {key: _strict(value) for key, value in node.items()}
        if ("properties" in strict and "additionalProperties" not in strict
                and not strict.get("x-kubernetes-preserve-unknown-fields")):
            strict["additionalProperties"] = False
        return strict
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@cache
def _validator(file: str) -> jsonschema.protocols.Validator:
    document = json.loads((SCHEMAS / file).read_text())
    schema = _strict(document["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def is_custom(manifest: Manifest) -> bool:
    return any((manifest["apiVersion"], manifest["kind"]) == (api, kind) for api, kind, _ in CUSTOM_KINDS)


def validate_strictly(manifest: Manifest, channel: str = "standard") -> None:
    """Validate against Kubernetes 1.33 (built-in kinds) or the vendored CRD schema, strictly;
    ``channel`` picks the Gateway API CRD channel (``standard`` or ``experimental``)."""
    if not is_custom(manifest):
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        return
    key = (manifest["apiVersion"], manifest["kind"], channel)
    file = CUSTOM_KINDS.get(key) or CUSTOM_KINDS[(key[0], key[1], "standard")]
    errors = sorted(_validator(file).iter_errors(manifest), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert _DNS_SUBDOMAIN.fullmatch(manifest["metadata"]["name"]), manifest["metadata"]["name"]
