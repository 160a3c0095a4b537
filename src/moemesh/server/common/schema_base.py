"""The base of every request body: strict types, finite numbers, valid Unicode text.

Strict: a number must be a JSON number. Unknown fields are ignored (clients send fields such as
``user`` or ``store`` that change nothing here). Python's JSON parser accepts ``Infinity`` and
``NaN``, so floats are checked finite. JSON may carry a lone UTF-16 surrogate (``"\\ud800"``),
which Python keeps in a str but which no tokenizer or UTF-8 encoder accepts: every string, also
inside free-form objects (content parts, tool schemas), is checked here and refused by field.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic_core import PydanticCustomError


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError(
                "invalid_unicode", "text is not valid Unicode (a lone surrogate at character {at})",
                {"at": exc.start}) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_text(item)


class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if not isinstance(value, BaseModel):  # nested bodies checked their own fields already
            _check_text(value)
        return value
