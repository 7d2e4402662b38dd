"""The chat template omniray writes into its tiny checkpoints.

The processor always renders the template the checkpoint ships; this constant is what `omniray make-tiny`
writes. It follows the Qwen3-Omni Instruct template's multimodal behaviour: no default system message, content
items concatenated without separators, image/audio/video items replaced by their wrapped placeholders, and
`<|im_start|>assistant\\n` as the generation prompt.
"""

QWEN3_OMNI_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for c in message['content'] %}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'audio' or 'audio' in c or 'audio_url' in c %}{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif c['type'] == 'video' or 'video' in c %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
