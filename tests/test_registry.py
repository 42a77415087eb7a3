import pytest

from topkd.registry import Registry


def test_register_get_and_errors():
    reg = Registry("widget")

    @reg.register("Alpha")
    def alpha():
        return 1

    @reg.register()
    def beta():
        return 2

    assert reg.get("alpha") is alpha and reg.get("ALPHA")() == 1
    assert reg.names() == ["alpha", "beta"] and "beta" in reg and len(reg) == 2
    with pytest.raises(ValueError, match=r"unknown widget 'alpah'.*Did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(lambda: 3)
