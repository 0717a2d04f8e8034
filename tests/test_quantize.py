import copy

import pytest
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.formats import IntFormat, dynamic_qparams, get_format, quantize_int
from vitcompress.int8 import Int8Linear, cpu_has_vnni, to_int8_
from vitcompress.models import build_model
from vitcompress.models.vit import MatMul
from vitcompress.quantize import ActivationQuantizer, QuantLinear, QuantMatMul, round_scale
from vitcompress.steps.quantize import CalibrationConfig, QuantizeConfig, quantize_


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


@pytest.fixture(scope="module")
def vit_and_data():
    from vitcompress.models import model_config

    torch.manual_seed(0)
    cfg = model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=2)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 1, 16, 16, generator=g), torch.zeros(4)) for _ in range(3)]
    x = torch.randn(6, 1, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(x)
    return model, calib, x, ref


def quantized(vit_and_data, config, **kw):
    model, calib, x, ref = vit_and_data
    m = copy.deepcopy(model)
    quantize_(m, config, kw.get("calib", calib))
    with torch.no_grad():
        return m, m(x), ref


def test_int8_weight_only_per_channel_is_close(vit_and_data):
    m, y, ref = quantized(vit_and_data, QuantizeConfig(activations=None))
    assert sqnr(ref, y) > 30
    layer = m.blocks[0].mlp.fc1
    assert isinstance(layer, QuantLinear) and layer.input_quant is None
    assert layer.weight_scale.shape == (layer.out_features, 1)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127
    # the weight computed with is exactly codes x scales, and the codes reach the range's ends
    assert torch.equal(layer.weight, layer.qweight.float() * layer.weight_scale)
    assert (layer.qweight.abs().amax(dim=1) == 127).all()
    assert isinstance(m.patch_embed.proj, nn.Conv2d)  # the patch embedding stays in float


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_int8_static_calibrated(vit_and_data, method):
    cfg = QuantizeConfig(calibration=CalibrationConfig(method=method, percentile=99.0))
    m, y, ref = quantized(vit_and_data, cfg)
    assert 15 < sqnr(ref, y) < 60  # quantised, yet still the same function
    aq = m.blocks[1].attn.qkv.input_quant
    assert bool(aq.calibrated) and aq.scale > 0 and aq.zero_point == 0
    assert (aq.fmt.qmin, aq.fmt.qmax) == (-128, 127)  # activations: full range; weights: narrow
    assert (m.blocks[1].attn.qkv.weight_format.qmin, aq.fmt.qmax) == (-127, 127)
    if method != "minmax":
        mm, _, _ = quantized(vit_and_data, QuantizeConfig())
        assert aq.scale <= mm.blocks[1].attn.qkv.input_quant.scale  # clipped, never wider


def test_int4_per_group(vit_and_data):
    cfg = QuantizeConfig(weights="int4", activations=None, granularity="per_group", group_size=16)
    m, y, ref = quantized(vit_and_data, cfg)
    layer = m.blocks[0].mlp.fc2  # in_features 128 -> 8 groups
    assert layer.weight_scale.shape == (layer.out_features, 8)
    assert layer.qweight.abs().max() <= 7
    tensor_wise = QuantizeConfig(weights="int4", activations=None, granularity="per_tensor")
    _, y_t, _ = quantized(vit_and_data, tensor_wise)
    assert 8 < sqnr(ref, y) and sqnr(ref, y_t) < sqnr(ref, y)


def test_dynamic_needs_no_calibration_and_is_per_image(vit_and_data):
    model, _, x, ref = vit_and_data
    m = copy.deepcopy(model)
    quantize_(m, QuantizeConfig(dynamic=True))  # no data
    with torch.no_grad():
        y = m(x)
        y1 = m(x[:1])
    assert sqnr(ref, y) > 20
    torch.testing.assert_close(y1, y[:1], rtol=1e-5, atol=1e-5)  # independent of the batch


def test_missing_calibration_data_raises_before_any_change(vit_and_data):
    model = copy.deepcopy(vit_and_data[0])
    with pytest.raises(VitcompressError, match="calib_data"):
        quantize_(model, QuantizeConfig())
    assert not any(isinstance(mod, QuantLinear) for mod in model.modules())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(weights="int9"), "weights"),
        (dict(activations="fp7"), "activations"),
        (dict(granularity="per_row"), "granularity"),
        (dict(group_size=0), "group_size"),
        (dict(attention_matmul="int1"), "attention_matmul"),
        (dict(dynamic="yes"), "dynamic"),
        (dict(calibration=dict(percentile=150)), "percentile"),
        (dict(calibration=dict(batches=0)), "batches"),
        (dict(calibration=dict(method="kl")), "method"),
        (dict(calibration=dict(bathces=4)), "calibration"),
        (dict(targets=["re:blocks.(["]), "regular expression"),
        (dict(scales="fp8"), "scales"),
        (dict(rest="uint8"), "rest"),
        (dict(rest="fp8_e4m3"), "rest"),
    ],
)
def test_bad_config_values_fail_at_construction(kwargs, field):
    with pytest.raises(VitcompressError, match=field):
        QuantizeConfig(**kwargs)


def test_calibration_config_direct_errors():
    with pytest.raises(VitcompressError, match="percentile"):
        CalibrationConfig(percentile=0)
    assert QuantizeConfig(calibration={"method": "mse"}).calibration.method == "mse"


def test_attention_matmul_only_when_asked(vit_and_data):
    base = QuantizeConfig(dynamic=True)
    m0, y0, _ = quantized(vit_and_data, base)
    attn0 = m0.blocks[0].attn
    assert attn0.fused_attn and type(attn0.qk_matmul) is MatMul
    m1, y1, ref = quantized(vit_and_data, QuantizeConfig(dynamic=True, attention_matmul="int8"))
    attn1 = m1.blocks[0].attn
    assert not attn1.fused_attn
    assert isinstance(attn1.qk_matmul, QuantMatMul) and isinstance(attn1.av_matmul, QuantMatMul)
    assert not torch.allclose(y0, y1) and sqnr(ref, y1) > 15
    # static attention quantizers are calibrated like the others
    m2, y2, _ = quantized(vit_and_data, QuantizeConfig(attention_matmul="int8"))
    assert bool(m2.blocks[0].attn.av_matmul.a_quant.calibrated)


def test_attention_matmul_unsupported_model_raises():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(VitcompressError, match="MatMul"):
        quantize_(mlp, QuantizeConfig(dynamic=True, attention_matmul="int8"))


def test_pattern_matching_nothing_raises_and_ignore_works(vit_and_data):
    model = copy.deepcopy(vit_and_data[0])
    with pytest.raises(VitcompressError, match="fc9"):
        quantize_(model, QuantizeConfig(dynamic=True, targets="blocks.*.mlp.fc9"))
    quantize_(model, QuantizeConfig(dynamic=True, targets="re:blocks\\.0\\..*", ignore="*.proj"))
    assert isinstance(model.blocks[0].mlp.fc1, QuantLinear)
    assert type(model.blocks[0].attn.proj) is nn.Linear
    assert type(model.blocks[1].mlp.fc1) is nn.Linear and type(model.head) is nn.Linear


def test_any_module_tree_with_tuple_batches():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    data = [(torch.randn(8, 16), torch.zeros(8)) for _ in range(20)]
    seen = []

    def batches():
        for b in data:
            seen.append(1)
            yield b

    x = torch.randn(32, 16)
    ref = mlp(x).detach()
    quantize_(mlp, QuantizeConfig(calibration={"batches": 3}), batches())
    assert len(seen) == 3  # never more than calibration.batches
    assert sqnr(ref, mlp(x).detach()) > 25


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp16", "tf32", "e2m1"])
def test_float_formats(vit_and_data, name):
    cfg = QuantizeConfig(weights=name, activations=name)
    m, y, ref = quantized(vit_and_data, cfg)
    layer = m.blocks[0].attn.qkv
    fmt = get_format(name)
    if fmt.bits <= 8:  # scaled so that each row's largest magnitude lands on fmt.max
        amax = (layer.weight / layer.weight_scale).abs().amax(dim=1)
        assert torch.allclose(amax, torch.full_like(amax, fmt.max))
        assert bool(layer.input_quant.calibrated)
    else:
        assert layer.weight_scale is None
        assert torch.equal(layer.weight, fmt.quantize(layer.weight))
    if name == "fp8_e4m3":
        assert layer.qweight.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight, layer.qweight.float() * layer.weight_scale)
    want = {"fp8_e4m3": 15, "fp16": 50, "tf32": 50, "e2m1": 0}[name]
    assert sqnr(ref, y) > want


def test_state_dict_round_trip(vit_and_data):
    model, calib, x, _ = vit_and_data
    cfg = QuantizeConfig(calibration={"method": "percentile"}, attention_matmul="int8")
    m, y, _ = quantized(vit_and_data, cfg)
    fresh = copy.deepcopy(model)
    quantize_(fresh, cfg, calibrate=False)
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


# --- real int8 ------------------------------------------------------------------------------

# Same codes, so the only difference is fp32 rounding of a K-term sum: |diff| <= 1e-5 of the
# output scale (measured: ~1e-7 relative).
INT8_RTOL = 1e-5
HAS_FBGEMM = bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def close_to_emulation(out: torch.Tensor, emu: torch.Tensor) -> None:
    assert (out - emu).abs().max() <= INT8_RTOL * emu.abs().max()


@pytest.mark.parametrize(
    "cfg,backend",
    [
        (QuantizeConfig(dynamic=True), "auto"),
        (QuantizeConfig(granularity="per_tensor"), "int_mm"),
        (QuantizeConfig(calibration={"method": "percentile", "percentile": 99.0}), "fbgemm"),
        (QuantizeConfig(calibration={"method": "percentile", "percentile": 99.0}), "int_mm"),
        (QuantizeConfig(activations="uint8"), "auto"),
        (QuantizeConfig(activations="uint8", dynamic=True), "auto"),
    ],
    ids=[
        "dynamic",
        "static-per-tensor-w-int_mm",
        "static-clipped-fbgemm",
        "static-clipped-int_mm",
        "static-uint8-auto",
        "dynamic-uint8",
    ],
)
def test_real_int8_matches_emulation(vit_and_data, cfg, backend):
    m, y_emu, _ = quantized(vit_and_data, cfg)
    # without VNNI fbgemm's uint8 x int8 kernel saturates int16 pair sums: close, not exact
    exact = cfg.dynamic or backend == "int_mm" or not HAS_FBGEMM or cpu_has_vnni()
    to_int8_(m, backend=backend)
    layer = m.blocks[0].mlp.fc1
    assert isinstance(layer, Int8Linear) and layer.dynamic == cfg.dynamic
    assert layer.qweight.dtype == torch.int8
    assert any(p is layer.qweight for p in m.parameters())  # counted, at one byte each
    with torch.no_grad():
        if exact:
            close_to_emulation(m(vit_and_data[2]), y_emu)
        else:
            assert sqnr(y_emu, m(vit_and_data[2])) > 15
        if not cfg.dynamic and HAS_FBGEMM:  # auto picks fbgemm for static, and it ran
            assert (layer.backend == "int_mm") == (backend == "int_mm")
        twin = copy.deepcopy(m)  # the prepacked cache is not copied, but rebuilt
        torch.testing.assert_close(twin(vit_and_data[2]), m(vit_and_data[2]), rtol=0, atol=0)


def test_asymmetric_weights_have_no_int8_kernel(vit_and_data):
    m, _, _ = quantized(vit_and_data, QuantizeConfig(symmetric=False, dynamic=True))
    with pytest.raises(VitcompressError, match="blocks.0.attn.qkv.*symmetric"):
        to_int8_(m)


def test_fbgemm_refuses_per_token():
    lin = nn.Linear(8, 4)
    il = Int8Linear.from_linear(lin)
    with pytest.raises(VitcompressError, match="per-token"):
        Int8Linear(il.qweight.data, il.weight_scale, None, il.input_format, backend="fbgemm")


def test_int8_linear_odd_shapes_tiles_and_same_codes(monkeypatch):
    import vitcompress.int8 as qmod

    torch.manual_seed(0)
    lin = nn.Linear(37, 19)
    x = torch.randn(2, 150, 37)  # 300 rows: two tiles, the last one partial
    act = IntFormat(8, narrow=False)  # activations: the full [-128, 127]
    aq = ActivationQuantizer(act, dynamic=True)
    ql = QuantLinear.from_linear(lin, get_format("int8"), input_quant=aq)
    il = Int8Linear.from_linear(lin)
    seen = []
    real_mm = qmod._int8_mm
    monkeypatch.setattr(qmod, "_int8_mm", lambda a, b: seen.append(a.clone()) or real_mm(a, b))
    with torch.no_grad():
        emu = ql(x)
        out = il(x)
    assert out.shape == (2, 150, 19) and len(seen) == 2
    close_to_emulation(out, emu)
    assert torch.equal(il.qweight, ql.qweight)
    x2 = x.reshape(-1, 37)
    s, z = dynamic_qparams(x2, act)
    assert torch.equal(torch.cat(seen), quantize_int(x2, s, z, -128, 127))  # the very same codes


def test_to_int8_rejects_weight_only_and_needs_quant_layers(vit_and_data):
    m, _, _ = quantized(vit_and_data, QuantizeConfig(activations=None))
    with pytest.raises(VitcompressError, match="weight-only"):
        to_int8_(m)
    with pytest.raises(VitcompressError, match="QuantLinear"):
        to_int8_(copy.deepcopy(vit_and_data[0]))


def test_fp16_scales_and_rest(vit_and_data):
    model = vit_and_data[0]
    _, ref8, ref = quantized(vit_and_data, QuantizeConfig(dynamic=True))
    m, y, _ = quantized(vit_and_data, QuantizeConfig(dynamic=True, scales="fp16", rest="fp16"))
    assert sqnr(ref, y) > 30 and sqnr(ref, y) > sqnr(ref, ref8) - 3  # costs little accuracy
    for name, layer in m.named_modules():
        if isinstance(layer, QuantLinear):
            s = layer.weight_scale
            assert torch.equal(s.half().float(), s) and (s > 0).all(), name
            # the codes are those of the rounded scale, and weight = codes x scale exactly
            w = model.get_submodule(name).weight.detach()
            codes = quantize_int(w, s, torch.zeros_like(s), -127, 127)
            assert torch.equal(layer.qweight.float(), codes.float()), name
            assert torch.equal(layer.weight, layer.qweight.float() * s), name
    derived = {id(q.weight) for q in m.modules() if isinstance(q, QuantLinear)}
    rest = [p for p in m.parameters() if id(p) not in derived]
    assert rest and all(torch.equal(p.half().float(), p) for p in rest)
    # and the model's other parameters were really rounded, not already fp16-exact
    assert not torch.equal(model.pos_embed.half().float(), model.pos_embed)
    assert torch.equal(m.pos_embed, model.pos_embed.half().float())


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_rest(vit_and_data, bits):
    model = vit_and_data[0]
    _, ref8, ref = quantized(vit_and_data, QuantizeConfig(dynamic=True))
    m, y, _ = quantized(vit_and_data, QuantizeConfig(dynamic=True, rest=f"int{bits}"))
    if bits == 8:  # costs little accuracy next to int8 weights alone
        assert sqnr(ref, y) > 25 and sqnr(ref, y) > sqnr(ref, ref8) - 6
    qmax = 2 ** (bits - 1) - 1
    derived = {id(q.weight) for q in m.modules() if isinstance(q, QuantLinear)}
    before = dict(model.named_parameters())
    rest = [(n, p) for n, p in m.named_parameters() if id(p) not in derived]
    assert {n for n, _ in rest} >= {"pos_embed", "cls_token", "patch_embed.proj.weight"}
    for name, p in rest:
        # per slice along dim 0 (one slice for vectors): codes in [-qmax, qmax] x a bf16 scale,
        # the scale of the slice's largest magnitude, computed in float64
        w = before[name].detach().double().reshape(p.shape[0] if p.dim() >= 2 else 1, -1)
        s = (w.abs().amax(1, keepdim=True) / qmax).float().bfloat16().double()
        codes = torch.clamp(torch.round(w / torch.where(s > 0, s, 1.0)), -qmax, qmax)
        assert torch.equal(p.detach().double().reshape(w.shape), codes * s), name
    assert torch.unique(m.patch_embed.proj.weight.detach().abs().amax((1, 2, 3))).numel() > 1


def test_round_scale_stays_positive_and_finite():
    s = torch.tensor([1e-30, 3e-8, 1.0 / 3, 1e6])
    r16 = round_scale(s, torch.float16)
    assert torch.equal(r16, torch.tensor([2.0**-24, 2.0**-25 * 2, 0.333251953125, 65504.0]))
    r_bf = round_scale(s, torch.bfloat16)
    assert torch.equal(r_bf, s.bfloat16().float()) and (r_bf > 0).all()
    assert round_scale(s, torch.float32) is s


@pytest.mark.skipif(not HAS_FBGEMM, reason="no fbgemm/x86 quantized engine")
def test_fbgemm_is_exact_with_7_bit_weights_on_any_cpu(vit_and_data):
    # 255 x 63 x 2 fits int16: no saturation even without VNNI
    m, y_emu, _ = quantized(vit_and_data, QuantizeConfig(weights="int7"))
    to_int8_(m, backend="fbgemm")
    assert m.blocks[0].mlp.fc1.qweight.abs().max() <= 63
    with torch.no_grad():
        close_to_emulation(m(vit_and_data[2]), y_emu)
