"""The base of every typed record a run writes (report.json and the run's reports): frozen, unknown keys refused,
verdicts computed rather than stored, and the JSON layout earlier releases wrote (key order, absent keys).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer, model_validator


class Record(BaseModel):
    """A frozen record. Layout rules of its JSON form:

    - a field whose default is None, and a computed field, is left out while it is None;
    - a computed field (a verdict) found in the input is not read: it is computed again from the figures;
    - `LAYOUT`, when given, is the order of the keys (those not named follow in field order).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    LAYOUT: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _computed_is_not_read(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_computed_fields:
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data

    @model_serializer(mode="wrap")
    def _layout(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        for name in list(data):
            optional = name in fields and not fields[name].is_required() and fields[name].default is None
            if data[name] is None and (optional or name in type(self).model_computed_fields):
                del data[name]
        if self.LAYOUT:
            rank = {k: i for i, k in enumerate(self.LAYOUT)}
            data = dict(sorted(data.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        return data
