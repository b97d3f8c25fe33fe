"""Concepts files as editors and spreadsheets write them: a byte-order mark, quoted values, other encodings.
(The formats themselves are tested in test_batch.py, test_concept_files.)"""

import json
import re

import ml_collections
import pytest

from esd_jax.concepts import Concept, ConceptError, of_config, read_concepts

BOM = b'\xef\xbb\xbf'


def write(path, data: bytes):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize('newline', ['\n', '\r\n'])
def test_bom_before_the_csv_header(tmp_path, newline):
  text = newline.join(['concept,erase_from,negative_guidance', 'circle,,', 'car,a red car,2.5', ''])
  path = write(tmp_path / 'c.csv', BOM + text.encode())
  assert read_concepts(path) == [Concept('circle'), Concept('car', 'a red car', 2.5)]


def test_bom_in_text_and_json(tmp_path):
  assert read_concepts(write(tmp_path / 'c.txt', BOM + b'Van Gogh\nClaude Monet\n')) == [
      Concept('Van Gogh'), Concept('Claude Monet')]
  data = BOM + json.dumps(['red', {'concept': 'cross', 'negative_guidance': 3}]).encode()
  assert read_concepts(write(tmp_path / 'c.json', data)) == [Concept('red'), Concept('cross', '', 3.0)]


def test_non_ascii_utf8(tmp_path):
  path = write(tmp_path / 'c.csv', BOM + 'concept,erase_from\nCézanne,a painting by Cézanne\n'.encode())
  assert read_concepts(path) == [Concept('Cézanne', 'a painting by Cézanne')]


@pytest.mark.parametrize('bom', [b'', BOM])
def test_invalid_utf8_names_the_file_offset_and_fix(tmp_path, bom):
  data = bom + 'concept\ncircle\nC\xe9zanne\n'.encode('latin-1')  # a spreadsheet's "CSV" in Windows-1252
  path = write(tmp_path / 'c.csv', data)
  offset = data.index(b'\xe9')
  with pytest.raises(ConceptError) as raised:
    read_concepts(path)
  message = str(raised.value)
  assert message.startswith(f'{path}: not UTF-8 text')
  assert f'byte offset {offset}, line 3' in message
  assert 'save the file as UTF-8' in message


def test_a_quoted_comma_is_a_value(tmp_path):
  path = write(tmp_path / 'c.csv', b'concept,erase_from\n"cat, black","a cat, black, on a mat"\ndog,\n')
  assert read_concepts(path) == [Concept('cat, black', 'a cat, black, on a mat'), Concept('dog')]


@pytest.mark.parametrize('field', ['concept', 'erase_from'])
@pytest.mark.parametrize('newline', ['\n', '\r\n'])
def test_a_line_break_inside_a_prompt_is_refused_naming_its_lines(tmp_path, field, newline):
  rows = {'concept': 'circle,a red circle\n"a big\nsquare",\n',
          'erase_from': 'circle,a red circle\nsquare,"a big\nsquare"\n'}
  text = ('concept,erase_from\n\n' + rows[field]).replace('\n', newline)  # a blank line 2 is skipped, still counted
  path = write(tmp_path / 'c.csv', text.encode())
  with pytest.raises(ConceptError, match=re.escape(f'{path} lines 4-5: {field} ') + '.*one line'):
    read_concepts(path)


def test_a_line_break_at_the_end_of_a_quoted_value_is_stripped(tmp_path):
  path = write(tmp_path / 'c.csv', b'concept,erase_from\n"circle\n",\nsquare,\n')
  assert read_concepts(path) == [Concept('circle'), Concept('square')]


def test_rows_after_a_quoted_line_break_keep_their_line_numbers(tmp_path):
  path = write(tmp_path / 'c.csv', b'concept,negative_guidance\n"circle\n",1\n\nsquare,lots\n')
  with pytest.raises(ConceptError, match=re.escape(f"{path} line 5: negative_guidance 'lots'")):
    read_concepts(path)


def test_more_values_than_columns_is_named(tmp_path):
  path = write(tmp_path / 'c.csv', b'concept,erase_from\ncircle,a red circle\ncat, black,a cat\n')
  with pytest.raises(ConceptError, match=re.escape(f'{path} line 3: 1 more value(s) than the header has columns')):
    read_concepts(path)


def test_a_line_break_in_a_json_or_config_prompt_is_refused(tmp_path):
  path = write(tmp_path / 'c.json', json.dumps([{'concept': 'cat', 'erase_from': 'a\ncat'}]).encode())
  with pytest.raises(ConceptError, match=re.escape(f"{path} entry 0: erase_from 'a\\ncat' holds a line break")):
    read_concepts(path)
  erase = ml_collections.ConfigDict({'concepts': ('a\ncat',), 'erase_from': '', 'concepts_file': ''})
  with pytest.raises(ConceptError, match=re.escape("erase.concepts[0]: concept 'a\\ncat' holds a line break")):
    of_config(erase)


def test_negative_guidance_of_a_concept_is_not_negative(tmp_path):
  path = write(tmp_path / 'c.csv', b'concept,negative_guidance\ncat,-1\n')
  message = f"{path} line 2: negative_guidance '-1' is not a finite number ≥ 0"
  with pytest.raises(ConceptError, match=re.escape(message)):
    read_concepts(path)
