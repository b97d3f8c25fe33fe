"""The attack and robust erasure (esd_jax/attack.py, esd.Adversary): the gradients of both of the attack's
objectives against the PyTorch reference (tests/torch_attack.py), robust erasure with no search steps is plain ESD
to the bit, the `attack` command resumes an interrupted search to the bit and on a mesh of 8 devices finds what one
device finds, and on the shapes world the attack brings a shallowly erased circle back where the unattacked prompt
and an unoptimised prefix do not."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from esd_jax import attack, commands, esd
from esd_jax.errors import RunError
from esd_jax.files import SafetensorsReader, write_safetensors
from esd_jax.loading import load_model
from esd_jax.methods import trained_keys
from esd_jax.models.state_dict import split_flat
from esd_jax.schedulers import make_scheduler
from esd_jax.train import encode_concepts, plan_run
from tests import torch_attack
from tests.multihost import main_py
from tests.reference import rel_err


def _config(model, **erase):
  config = get_config()
  config.model = str(model)
  config.erase.concepts = ('a cat',)
  config.erase.update(erase)
  return config


def test_bad_attack_settings_are_refused_naming_the_fix():
  from transformers import CLIPTokenizer

  from esd_jax import shapes_world
  from esd_jax.validate import ConfigError, check

  check(get_config(), 'attack')
  config = get_config()
  config.attack.handoff = (0, 60)
  with pytest.raises(ConfigError, match=r'attack\.handoff.*≤ --config\.attack\.sample_steps=50'):
    check(config, 'attack')
  config = get_config()
  config.attack.classifier = ''
  with pytest.raises(ConfigError, match=r"'denoise' with --config\.attack\.classifier=''"):
    check(config, 'attack')
  config = get_config()
  config.erase.update(adversarial=True, separate_models=True)
  with pytest.raises(ConfigError, match=r'--config\.erase\.adversarial=True.*erase each concept in a run of its own'):
    check(config, 'erase')
  # The shapes world reads 8 tokens: "a red circle" leaves room for 3 adversarial ones.
  tokenizer = CLIPTokenizer.from_pretrained(str(shapes_world.PIPELINE / 'tokenizer'))
  ids, slots = attack.prefixed(tokenizer, ['a red circle'], 3)
  assert slots[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0] and ids[0, 4:7].tolist() == tokenizer('a red circle').input_ids[1:4]
  with pytest.raises(ValueError, match='lower --config.attack.tokens to at most 3'):
    attack.prefixed(tokenizer, ['a red circle'], 4)


def _adversarial_embeds(pipe, prompts, rng):
  """(ids, slots, the text encoder's layout and parameters, word embeddings) of `prompts` with 2 adversarial tokens
  each: random candidate tokens, their embeddings moved off the vocabulary's rows as the search moves them."""
  ids, slots = attack.prefixed(pipe.tokenizer, prompts, 2)
  text_layout, encoder = split_flat(pipe.text_encoder)
  table = np.asarray(encoder[esd.TOKEN_EMBEDDING])
  ids[slots > 0] = rng.choice(attack.candidate_tokens(pipe.tokenizer, len(table)), int(slots.sum()))
  embeds = (table[ids] + slots[..., None] * rng.standard_normal(table[ids].shape)).astype(np.float32)
  return ids, slots, text_layout, encoder, embeds


@pytest.mark.parity
def test_attack_gradient_matches_pytorch(model):
  from diffusers import StableDiffusionPipeline

  pipe = load_model(_config(model))
  ref = StableDiffusionPipeline.from_pretrained(str(model))
  rng = np.random.default_rng(0)
  ids, slots, text_layout, encoder, embeds = _adversarial_embeds(pipe, ['a photo of a cat', 'a dog'], rng)
  x0, noise = (rng.standard_normal((2, 16, 16, 4)).astype(np.float32) for _ in range(2))
  t = np.asarray([437, 91])  # one timestep per image, as the search draws them
  scheduler = make_scheduler(pipe.scheduler_config, 'ddim')
  layout, params = split_flat(pipe.unet)
  loss_fn = lambda e: attack.attack_loss(layout.module(params), text_layout, encoder, e, jnp.asarray(x0), jnp.asarray(t),
                                         jnp.asarray(noise), scheduler.alphas_cumprod)
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(embeds))

  nchw = lambda a: a.transpose(0, 3, 1, 2)
  want = torch_attack.attack_loss_and_grad(ref.text_encoder, ref.unet, ref.scheduler.alphas_cumprod, ids=ids,
                                           slots=slots > 0, adversarial=embeds, x0=nchw(x0), t=t, noise=nchw(noise))
  assert abs(float(loss) - want['loss']) <= 1e-5 * want['loss']
  grad = np.asarray(grad) * slots[..., None]  # the search moves the slots only
  assert np.abs(want['grad']).max() > 0 and rel_err(grad, want['grad']) <= 1e-4


@pytest.mark.parity
def test_classifier_objective_gradient_matches_pytorch(model):
  # The classifier objective differentiates through the whole sampler (3 DDIM steps with guidance), the decoder and
  # the judge: the same weights, noise and embeddings in torch (tests/torch_attack.py). The judge is a randomly
  # initialised shapes classifier with the 'none' answers: its gradient exercises the same path as the shipped one's.
  from diffusers import StableDiffusionPipeline

  from esd_jax.generate import encode_prompts
  from esd_jax.models.state_dict import state_dict
  from esd_jax.shapes_world import classifier

  pipe = load_model(_config(model))
  ref = StableDiffusionPipeline.from_pretrained(str(model))
  judge = classifier.build_classifier(classifier.JUDGE, seed=3)
  rng = np.random.default_rng(1)
  ids, slots, text_layout, encoder, embeds = _adversarial_embeds(pipe, ['a red circle', 'a dog'], rng)
  latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  steps, guidance, head, label = 3, 3.0, 0, 2
  layout, params = split_flat(pipe.unet)
  uncond = encode_prompts(pipe, ['', '']).context
  loss_fn = lambda e: attack.judged_loss(
      layout.module(params), pipe.vae, judge, make_scheduler(pipe.scheduler_config, 'ddim'), steps,
      esd.encode_embeddings(text_layout, encoder, e), jnp.asarray(latents), uncond, jnp.float32(guidance),
      jnp.asarray([head, label]))
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(embeds))

  twin = torch_attack.ShapesClassifier(judge.config, state_dict(judge))
  uncond_ids = ref.tokenizer(['', ''], padding='max_length', max_length=ref.tokenizer.model_max_length).input_ids
  want = torch_attack.judged_loss_and_grad(
      ref.text_encoder, ref.unet, ref.vae, ref.scheduler, twin, ids=ids, slots=slots > 0, adversarial=embeds,
      uncond_ids=uncond_ids, latents=latents.transpose(0, 3, 1, 2), steps=steps, guidance=guidance, head=head,
      label=label)
  assert abs(float(loss) - want['loss']) <= 1e-5 * abs(want['loss'])  # measured: equal to 8 digits
  grad = np.asarray(grad) * slots[..., None]
  assert np.abs(want['grad']).max() > 0 and rel_err(grad, want['grad']) <= 1e-4  # measured: 5.2e-6


def test_robust_step_without_search_steps_is_plain_esd(model):
  config = _config(model, adversarial=True, adversarial_steps=0)
  pipe = load_model(config)
  plan = plan_run(config)
  prompts = encode_concepts(pipe, plan.concepts, 3.0, height=None, width=None, retain=['a dog'])
  layout, frozen = split_flat(pipe.unet)
  trained = {k: frozen[k] for k in trained_keys(frozen, 'esd-u')}
  objective = esd.Objective(negative_guidance=3.0, ddim_steps=4)
  scheduler = objective.scheduler(pipe.scheduler_config)
  draws = esd.draw(jax.random.key(3), objective, scheduler, batch=1, latent_shape=(16, 16, 4), num_concepts=1,
                   num_retain=1)
  tx = esd.optimizer(1e-3)
  step = jax.jit(functools.partial(esd.train_step, layout=layout, objective=objective, scheduler=scheduler, tx=tx))
  run = lambda p: step(esd.init_state(trained, tx), frozen, p, draws)
  plain, plain_metrics = run(prompts)
  robust, robust_metrics = run(prompts._replace(adversary=attack.adversary_of(pipe, plan, config.erase)))
  assert float(robust_metrics['loss']) == float(plain_metrics['loss'])
  assert all(np.array_equal(robust.trained[k], plain.trained[k]) for k in trained)

  # With search steps the student is trained on another prompt: the step changes.
  config.erase.adversarial_steps = 2
  searched, searched_metrics = run(prompts._replace(adversary=attack.adversary_of(pipe, plan, config.erase)))
  assert np.isfinite(float(searched_metrics['loss'])) and float(searched_metrics['loss']) != float(plain_metrics['loss'])


def test_prefix_search_starts_from_drawn_vocabulary_tokens_before_the_prompt(model):
  # erase.adversarial_tokens = 2 (AdvUnlearn's prefix_k): with no search steps the student is asked at "<start> x₁ x₂
  # a cat <end>", x₁ x₂ the iteration's drawn tokens (never a special one), encoded by the text encoder as token ids.
  config = _config(model, adversarial=True, adversarial_steps=0, adversarial_tokens=2)
  pipe = load_model(config)
  adversary = attack.adversary_of(pipe, plan_run(config), config.erase)
  tokenizer = pipe.tokenizer
  special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
  assert adversary.candidates.shape == (adversary.encoder[esd.TOKEN_EMBEDDING].shape[0],)
  assert not special & set(np.asarray(adversary.candidates).tolist())
  objective = esd.Objective(negative_guidance=3.0, ddim_steps=4)
  ids = tokenizer(['a cat'], padding='max_length', max_length=tokenizer.model_max_length).input_ids[0]
  seen = set()
  for key in range(3):
    draws = esd.draw(jax.random.key(key), objective, objective.scheduler(pipe.scheduler_config), batch=2,
                     latent_shape=(16, 16, 4), num_concepts=1, prefix_tokens=2)
    drawn = np.asarray(adversary.candidates[(draws.prefix * adversary.candidates.shape[0]).astype(jnp.int32)])
    seen.add(tuple(drawn))
    want = pipe.text_encoder(jnp.asarray([ids[:1] + drawn.tolist() + ids[1:-2]])).last_hidden_state
    concept = encode_concepts(pipe, plan_run(config).concepts, 3.0, height=None, width=None).concept
    student = jax.tree.map(lambda a: jnp.broadcast_to(a, (2, *a.shape[1:])), concept)
    got = esd._adversarial(adversary, draws, student, lambda cond: jnp.zeros((2, 16, 16, 4)),
                           jnp.zeros((2, 16, 16, 4)))
    assert got.context.shape == student.context.shape
    np.testing.assert_allclose(got.context, jnp.broadcast_to(want, got.context.shape), rtol=1e-5, atol=1e-5)
  assert len(seen) == 3  # each iteration draws its own tokens


# The `attack` command on the tiny model: four models (the original for "cat" and for "dog", and two weights files that
# move one cross-attention tensor), each attacked on "a cat" from 2 seeds (the denoise objective, no judge), 4 search
# steps saved every 2.
ATTACK = dict(concepts=('cat', 'dog'), prompts=('a cat',), classifier='', objective='denoise', seeds=2, steps=4,
              checkpoint_every=2, tokens=1, sample_steps=2, grid_seeds=1)


def _weights(model, folder: Path) -> list[Path]:
  """Two ESD weights files (the authors' 2025 format: the changed tensors, diffusers keys) for the tiny model."""
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  with SafetensorsReader(model / 'unet' / 'diffusion_pytorch_model.safetensors') as unet:
    base = unet[key]()
  rng = np.random.default_rng(0)
  paths = [folder / f'w{i}' / 'unet_trained.safetensors' for i in range(2)]
  for path in paths:
    write_safetensors(path, {key: base + 0.1 * rng.standard_normal(base.shape).astype(np.float32)})
  return paths


def _attack_config(model, workdir, weights, **changes):
  config = get_config()
  config.model, config.workdir = str(model), str(workdir)
  config.attack.update(dict(ATTACK, weights=tuple(map(str, weights)), **changes))
  return config


def _found(workdir) -> tuple[dict[str, np.ndarray], list]:
  """The saved search's tensors (state and losses) and the report's prompts found."""
  with SafetensorsReader(Path(workdir) / 'attack' / 'search.safetensors') as saved:
    tensors = {k: v() for k, v in saved.items()}
  report = json.loads((Path(workdir) / 'attack' / 'report.json').read_text())
  return tensors, [row['found'] for row in report['models']]


@pytest.fixture(scope='module')
def attacked(model, tmp_path_factory):
  """(weights files, the workdir of the command run uninterrupted)."""
  folder = tmp_path_factory.mktemp('attack')
  weights = _weights(model, folder)
  commands.attack(_attack_config(model, folder / 'whole', weights))
  return weights, folder / 'whole'


def test_an_interrupted_attack_resumes_to_the_bit_and_refuses_other_settings(model, attacked, tmp_path, monkeypatch):
  weights, whole = attacked
  # Interrupted after its first chunk: a search of 2 steps, saved, then the same attack with 4 resumes from it.
  commands.attack(_attack_config(model, tmp_path, weights, steps=2))
  assert _found(tmp_path)[0]['losses'].shape == (4, 2)
  commands.attack(_attack_config(model, tmp_path, weights))
  (resumed, resumed_texts), (want, want_texts) = _found(tmp_path), _found(whole)
  assert sorted(resumed) == sorted(want) and resumed_texts == want_texts
  assert all(np.array_equal(resumed[k], want[k]) for k in want), [k for k in want if not np.array_equal(resumed[k], want[k])]

  # A finished attack's report is the answer: nothing is loaded or searched again.
  monkeypatch.setattr(commands, 'load_model', lambda *a, **k: pytest.fail('a finished attack was run again'))
  assert commands.attack(_attack_config(model, tmp_path, weights))['models'][0]['found'] == want_texts[0]
  monkeypatch.undo()
  # Other settings do not mix with the saved search.
  with pytest.raises(RunError, match=r'different attack \(key: .*use another --config\.workdir, or delete'):
    commands.attack(_attack_config(model, tmp_path, weights, seed=1))
  with pytest.raises(RunError, match=r'search of 4 steps, more than attack\.steps = 2'):
    commands.attack(_attack_config(model, tmp_path, weights, steps=2))


def test_the_attack_on_a_mesh_of_eight_devices_finds_what_one_device_finds(model, attacked, tmp_path):
  weights, whole = attacked
  flags = [f'--config.attack.{k}={v}' if isinstance(v, str) else f'--config.attack.{k}={v!r}'
           for k, v in dict(ATTACK, weights=tuple(map(str, weights))).items()]
  # concept 2 × data 2 × fsdp 2: two models and one attack per device, tensors of 1024 elements or more split in two.
  mesh = ['--config.mesh.concept=2', '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.min_shard_size=1024']
  run = main_py(['attack', f'--config.model={model}', f'--config.workdir={tmp_path}', *flags, *mesh], devices=8,
                cwd=tmp_path)
  assert 'attack: 4 models × 2 attacks on mesh concept 2 × data 2 × fsdp 2, 2 × 1 per device' in run.stderr, run.stderr
  (sharded, texts), (want, want_texts) = _found(tmp_path), _found(whole)
  assert texts == want_texts
  # The fsdp split and the data split change the order of float32 sums (a sharded matmul's partial sums, the
  # loss's sum over attacks): each step's numbers move by a few float32 ulps, which 4 Adam steps keep near that.
  for k in want:
    np.testing.assert_allclose(sharded[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parity
def test_attack_brings_back_a_shallowly_erased_circle_that_an_unoptimised_prefix_does_not(tmp_path):
  # A deliberately weak erasure: ESD-x (cross-attention only: the UNet still draws circles) erasing the circle from
  # "a red circle" with the batch erasure's circle recipe (configs/shapes_four_models.csv: η 6, lr 2e-4, 150
  # iterations; 60 left every red circle).
  from esd_jax.shapes_world import shallow
  from esd_jax.commands import weights_overlay
  from esd_jax.shapes_world.measure import load_judge
  from esd_jax.train import run_erasure

  config = get_config()
  config.workdir = str(tmp_path)
  config.erase.update(concepts=('circle',), erase_from='a red circle', method='esd-x', negative_guidance=6.0)
  config.train.update(iterations=150, learning_rate=2e-4)
  result = run_erasure(config, progress=False)
  pipe, judge = result.pipe, load_judge()
  weak = weights_overlay(pipe, result.trained)
  attack_with = lambda steps: attack.run_attack(
      pipe, [weak], [['a red circle']], range(4), shallow.seed_noise(pipe, range(4)),
      attack.Budget(steps=steps, objective='classifier'), key=jax.random.key(0), steps=25, judge=judge,
      concepts=[shallow.judged_concept('circle')])
  found, control = attack_with(15), attack_with(0)
  rates, unoptimised = shallow.success(judge, found, ['circle']), shallow.success(judge, control, ['circle'])
  assert rates['prompt'][0] <= 0.25, rates  # the erasure holds against the prompt as given
  assert unoptimised['continuous'][0] <= 0.25, unoptimised  # the random prefix alone brings nothing back
  assert rates['continuous'][0] >= 0.5, rates  # the search does
  assert found.losses[0, -1] < found.losses[0, 0]
