"""make_augment: determinism from the generator, shapes, and what each policy may and may not do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.data import AUGMENT_POLICIES, DataError, make_augment

RANDOM_POLICIES = [p for p in AUGMENT_POLICIES if p != "none"]


def _batch(n: int = 16, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _left_heavy(n: int, size: int = 32) -> torch.Tensor:
    """A bright vertical bar in the left quarter: any horizontal flip moves it to the right."""
    x = torch.zeros(n, 1, size, size)
    x[:, :, size // 4 : 3 * size // 4, size // 8 : size // 4 + 1] = 1.0
    return x


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_same_generator_seed_gives_identical_output(policy: str) -> None:
    augment = make_augment(policy, 32)
    x = _batch()
    first = augment(x, torch.Generator().manual_seed(5))
    again = augment(x, torch.Generator().manual_seed(5))
    other = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_resuming_from_saved_generator_state_is_exact(policy: str) -> None:
    augment, x = make_augment(policy, 32), _batch()
    gen = torch.Generator().manual_seed(1)
    augment(x, gen)
    state = gen.get_state()
    expected = augment(x, gen)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(augment(x, resumed), expected)


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32), (3, 64)])
def test_shape_dtype_and_range_preserved(policy: str, dtype: torch.dtype, channels: int, size: int) -> None:
    x = _batch(8, channels, size).to(dtype)
    out = make_augment(policy, size)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


def test_none_is_identity() -> None:
    x = _batch()
    assert make_augment("none", 32)(x, torch.Generator()) is x


def _flipped_count(policy: str, n: int = 256) -> int:
    x = _left_heavy(n)
    out = make_augment(policy, 32)(x, torch.Generator().manual_seed(0))
    left, right = out[..., :16].sum(dim=(1, 2, 3)), out[..., 16:].sum(dim=(1, 2, 3))
    return int((right > left).sum())


def test_digits_policy_never_flips() -> None:
    assert _flipped_count("digits") == 0


@pytest.mark.parametrize("policy", ["cifar", "imagenet"])
def test_cifar_and_imagenet_policies_flip_about_half(policy: str) -> None:
    assert 80 <= _flipped_count(policy) <= 176


def test_digits_moves_content_by_a_few_pixels_scaled_with_size() -> None:
    assert make_augment("digits", 32).max_shift_px == pytest.approx(2.5)  # type: ignore[attr-defined]
    assert make_augment("digits", 64).max_shift_px == pytest.approx(5.0)  # type: ignore[attr-defined]
    x = torch.zeros(256, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0
    out = make_augment("digits", 32)(x, torch.Generator().manual_seed(0))
    grid = torch.arange(32.0)
    mass = out.sum(dim=(1, 2, 3))
    centre_x = (out.sum(dim=(1, 2)) * grid).sum(-1) / mass
    centre_y = (out.sum(dim=(1, 3)) * grid).sum(-1) / mass
    shift = torch.stack([centre_x - 15.5, centre_y - 15.5], 1).abs()
    assert shift.max() <= 2.5 + 0.5 and shift.max() >= 1.5  # moves, but only a little
    assert torch.allclose(mass, torch.full_like(mass, 64.0), rtol=0.3)  # scale stays within ~10 %


def test_cifar_output_is_an_exact_window_of_the_reflect_padded_input() -> None:
    x = _batch(12, 3, 32, seed=3)
    out = make_augment("cifar", 32)(x, torch.Generator().manual_seed(9))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = set()
    for i in range(x.shape[0]):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            for window in [padded[i, :, dy : dy + 32, dx : dx + 32]]
            if torch.equal(out[i], window) or torch.equal(out[i], window.flip(-1))
        ]
        assert len(matches) == 1, f"sample {i} is not a single pad-4 crop"
        offsets.add(matches[0])
    assert len(offsets) > 1  # crops are random, not one fixed window


def test_generator_on_cpu_drives_batch_on_its_own_device() -> None:
    # Draws happen on the generator's device; the batch may live elsewhere (CUDA in training).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = _batch().to(device=device, dtype=torch.float64)
    for policy in RANDOM_POLICIES:
        assert make_augment(policy, 32)(x, torch.Generator(device="cpu").manual_seed(0)).device == x.device


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("flip", 32), "unknown augment policy 'flip'"),
        (("cifar", 4), "image_size=4"),
        (("digits", 32.0), "32.0"),
    ],
)
def test_make_augment_rejects_bad_arguments(args: tuple[object, object], needle: str) -> None:
    with pytest.raises(DataError) as info:
        make_augment(*args)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_augment_rejects_bad_batches() -> None:
    augment = make_augment("digits", 32)
    with pytest.raises(DataError, match="float"):
        augment(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.Generator())
    with pytest.raises(DataError, match="32x32"):
        augment(torch.zeros(2, 1, 16, 16), torch.Generator())
