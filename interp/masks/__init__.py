"""Differentiable weight masks: kinds, targets, mask sets and their training."""

from interp.masks.fast import UnwrappedLM, unwrap
from interp.masks.kinds import ContinuousSparsification, HardConcrete, MaskKind, kind_from_config
from interp.masks.maskset import HARD_LOGIT, MODES, MaskSet
from interp.masks.paper import load_paper_masks
from interp.masks.sampling import random_masks
from interp.masks.targets import BLOCK_KINDS, HFSlice, Target, find_targets
from interp.masks.train import FitResult, find_loss_spike, fit_masks
