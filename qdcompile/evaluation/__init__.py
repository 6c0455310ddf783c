"""Quality of quantized diffusion U-Nets: FID/KID, per-step SNR_Q against SNR_F (PTQD), sample PSNR.

For every configuration of one run (FP, W8A8 RTN, W4A8 RTN, W4A8 Q-Diffusion with and without
shortcut split), with the same seeds and sample counts:

* **FID and KID** of generated samples against real images (a fixed subset of the MNIST test
  set). Features come from an *offline* extractor registered with torch-fidelity: the
  project's MNIST classifier (128-d penultimate layer, :meth:`MnistClassifier.features`), or
  Inception-v3 (``inception-v3-compat``) when the user has its weights locally. With the
  classifier the numbers are **not comparable to published (Inception) FIDs**; they compare
  configurations with each other.
* **SNR_Q(t) = ‖ε‖₂ / ‖ε̂ − ε‖₂** (PTQD eq. 13, METHODS §3) of the quantized noise prediction
  ``ε̂`` against the FP one ``ε`` on the same inputs ``x_t``, taken along FP sampling
  trajectories, and **SNR_F(t) = ᾱ_t / (1 − ᾱ_t)** (PTQD eq. 14) for reference. PTQD's rule
  compares the two ratios as they are (``SNR_Q > SNR_F``). In dB, SNR_Q is ``20·log10`` of the
  norm ratio (= ``10·log10`` of the energy ratio, like :func:`snr_db`); SNR_F, a power ratio,
  is ``10·log10``.
* **PSNR** of quantized samples against FP samples from the same seeds (images in [0, 1]).

Quantized predictions come from a ``torch.compile(unet, backend="qdiff")`` model (the integer
kernels) or the fake-quant simulation of the same metadata (:mod:`qdcompile.simulate`); any
callable ``(x, t, kwargs) -> ε`` works for :func:`step_snr`.

FID/KID backends: ``"torch-fidelity"`` (``pip install -e ".[eval]"``; imported lazily) or
``"builtin"``: the same formulas (Fréchet distance of Gaussian fits of the features; unbiased
MMD² with the cubic polynomial kernel over random subsets, drawn as torch-fidelity draws them)
implemented here for machines where torch-fidelity cannot be imported (it needs a
torchvision that matches the installed torch; PyPI has none for CPU-only torch builds).

Modules: :mod:`.metrics` (Fréchet distance, colour shift), :mod:`.trajectory` (per-step SNR),
:mod:`.fid` (FID/KID and their feature extractors), :mod:`.configs` (what is compared),
:mod:`.runner` (:func:`run_quality`), :mod:`.report` (table, files, plots). SNR and PSNR in dB are
:mod:`qdcompile.metrics`; the recorded trajectories :mod:`qdcompile.trajectory`.

The command line is ``qdcompile eval`` (:mod:`qdcompile.commands.eval`) and
``python bench/quality.py``: they print a table and write ``quality-<model>-<stamp>.json``,
``.md``, ``-samples.png`` (FP and each configuration, same seeds) and ``-snr.png``.
"""
