"""The moderately complex JSON schema the structured-output benchmarks constrain to, and one
document that matches it."""

from __future__ import annotations

from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "status": {"enum": ["active", "suspended", "closed"]},
        "score": {"type": "number"},
        "verified": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
                 "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 40},
                           "city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "maxItems": 3,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "maxLength": 12},
                                     "qty": {"type": "integer"},
                                     "unit": {"enum": ["piece", "box", "kg"]}},
                      "required": ["sku", "qty", "unit"],
                      "additionalProperties": False},
        },
    },
    "required": ["id", "name", "status", "score", "verified", "tags", "address", "orders"],
    "additionalProperties": False,
}

DOCUMENT: dict[str, Any] = {
    "id": 4211, "name": "Ada Lovelace", "status": "active", "score": 97.5, "verified": True,
    "tags": ["analyst", "poet"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "orders": [{"sku": "ENG-001", "qty": 2, "unit": "piece"},
               {"sku": "PAPER", "qty": 5, "unit": "kg"}],
}
