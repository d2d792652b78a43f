"""Kubernetes-shaped objects: manifest loading/validation, server fields, kubectl output."""

from .deployments import expand_deployment, pod_template_hash
from .errors import FieldError, ManifestError
from .loader import LoadedObject, load_manifest_objects, load_manifests, object_ref
from .printers import dump, no_resources_message, print_table, to_list
from .registry import KINDS, KindSpec, kind_spec, register, resolve_resource
from .selectors import format_label_selector, selector_matches
from .server_fields import fill_server_fields
from .timefmt import format_rfc3339, human_duration, parse_rfc3339

__all__ = [
    "FieldError", "KINDS", "KindSpec", "LoadedObject", "ManifestError", "dump",
    "expand_deployment", "fill_server_fields", "format_label_selector", "format_rfc3339",
    "human_duration", "kind_spec", "load_manifest_objects", "load_manifests",
    "no_resources_message", "object_ref", "parse_rfc3339", "pod_template_hash", "print_table",
    "register", "resolve_resource", "selector_matches", "to_list",
]
