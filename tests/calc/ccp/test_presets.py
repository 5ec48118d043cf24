"""calc/ccp/presets.py and [[calc.ccp_models]]: a preset's values, explicit fields winning, the stable
param_id, and config errors naming the key."""

from __future__ import annotations

import msgspec
import pytest

from calc.ccp.presets import BASE, PRESETS, resolve, resolved_fields
from marginflow import config
from marginflow.config import CcpModelConfig


def test_preset_values_and_explicit_fields_win():
    s = resolve(CcpModelConfig(name="p", preset="prisma"), "2022-12-28")
    assert (s.measure, s.holding_days, s.lookback_days, s.ewma_lambda) == ("es", 2, 750, 0.94)
    assert (s.stress_combine, s.liquidity, s.long_option_credit) == ("max", True, 1.0)
    assert s.confidence == BASE["confidence"] == 0.99  # not in the prisma table: the base value
    s = resolve(CcpModelConfig(name="p", preset="prisma", holding_days=5, measure="var"), "2022-12-28")
    assert (s.holding_days, s.measure, s.lookback_days) == (5, "var", 750)
    s = resolve(CcpModelConfig(name="x", preset="span2"))
    assert (s.stress_combine, s.stress_weight, s.lookback_days) == ("weight", 0.75, 2520)
    # every preset key is a field of the struct, and BASE covers every field but name / preset
    fields = set(msgspec.structs.asdict(CcpModelConfig(name="n"))) - {"name", "preset"}
    assert set(BASE) == fields and all(set(t) <= fields for t in PRESETS.values())
    assert None not in resolved_fields(CcpModelConfig(name="n", preset="span2")).values()


def test_param_id_is_stable_and_changes_with_the_fields_and_the_date():
    a = resolve(CcpModelConfig(name="p", preset="prisma"), "2022-12-28").param_id
    assert a == resolve(CcpModelConfig(name="p", preset="prisma"), "2022-12-28").param_id
    assert a.startswith("p:") and a.endswith(":2022-12-28") and len(a.split(":")[1]) == 10
    # the same resolved values spelled explicitly: the same id
    same = CcpModelConfig(name="p", preset="prisma", holding_days=2, measure="es")
    assert resolve(same, "2022-12-28").param_id == a
    assert resolve(CcpModelConfig(name="p", preset="prisma", confidence=0.975), "2022-12-28").param_id != a
    assert resolve(CcpModelConfig(name="p", preset="prisma"), "2022-12-27").param_id != a


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"confidence": 1.5}, "calc.ccp_models[1].confidence: must be strictly between 0 and 1"),
        ({"confidence": 0.0}, "calc.ccp_models[1].confidence"),
        ({"holding_days": 0}, "calc.ccp_models[1].holding_days: must be an integer >= 1"),
        ({"ewma_lambda": 1.0}, "calc.ccp_models[1].ewma_lambda: must be in [0, 1)"),
        ({"stress_weight": 1.2}, "calc.ccp_models[1].stress_weight"),
        ({"long_option_credit": -0.1}, "calc.ccp_models[1].long_option_credit"),
        ({"rounding": -1.0}, "calc.ccp_models[1].rounding"),
        (
            {"stress_from": "2008-13-01", "stress_to": "2009-01-01"},
            "calc.ccp_models[1].stress_from: must be an ISO",
        ),
        ({"stress_from": "2009-01-01", "stress_to": "2008-01-01"}, "calc.ccp_models[1].stress_to"),
        ({"stress_from": "2009-01-01", "stress_to": ""}, "calc.ccp_models[1].stress_to"),
        ({"name": "hvar"}, "calc.ccp_models[1].name: 'hvar' is a built-in model's name"),
        ({"name": "a"}, "calc.ccp_models[1].name: 'a' is used by an earlier entry"),
        ({"measure": "mean"}, "ccp_models[1].measure"),
    ],
)
def test_config_errors_name_the_key(tmp_path, entry, match):
    toml = tmp_path / "c.toml"
    body = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in {"name": "b", **entry}.items())
    toml.write_text(f'[[calc.ccp_models]]\nname = "a"\npreset = "prisma"\n\n[[calc.ccp_models]]\n{body}')
    with pytest.raises(SystemExit) as e:
        config.load(toml)
    assert match in str(e.value)


def test_the_shipped_config_has_both_presets():
    models = {m.name: m for m in config.load().calc.ccp_models}
    assert models["prisma"].preset == "prisma" and models["span2"].preset == "span2"
    # the preset of a resolved stress period passes the same checks (a stressed period from one field
    # and the other from the preset must agree)
    with pytest.raises(ValueError, match=r"calc.ccp_models\[0\].stress_to"):
        resolve(
            CcpModelConfig(name="p", preset="prisma", stress_from="2010-01-04"), where="calc.ccp_models[0]"
        )
