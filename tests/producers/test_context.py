from __future__ import annotations

import asyncio

import pytest

from producers.context import apply_attribution, current_attribution, usage_context


def test_contexts_nest_and_tags_merge() -> None:
    with usage_context(tenant_id="acme", feature="search", tags={"a": "1"}):
        with usage_context(user_id="u-1", tags={"b": "2"}):
            filled = apply_attribution({"model": "gpt-4o", "feature": "explicit"})
            assert filled["tenant_id"] == "acme" and filled["user_id"] == "u-1"
            assert filled["feature"] == "explicit"  # explicit fields win
            assert filled["tags"] == {"a": "1", "b": "2"}
        assert "user_id" not in current_attribution()
    assert dict(current_attribution()) == {}


def test_unknown_context_field_is_rejected() -> None:
    with pytest.raises(TypeError, match="model"), usage_context(model="gpt-4o"):
        pass


def test_context_is_per_task() -> None:
    async def request(tenant: str) -> str:
        with usage_context(tenant_id=tenant):
            await asyncio.sleep(0.01)
            return str(apply_attribution({})["tenant_id"])

    async def main() -> list[str]:
        return list(await asyncio.gather(request("a"), request("b")))

    assert asyncio.run(main()) == ["a", "b"]
