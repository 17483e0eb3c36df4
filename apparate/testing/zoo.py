"""Small randomly initialised models of the architectures users serve, written as their
authors write them (no adapter in apparate was written for any of them), for tests/ and bench/.
``ZOO`` maps a CNN family to its class; ``hf_model`` builds a tiny ``transformers`` classifier
of a family from its config (transformers comes with the demo extra)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def plain_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5))


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (8, 16, 16):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(),
                                        nn.Linear(32, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)),
            InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1),
            InvertedResidual(12, 16, 1), InvertedResidual(16, 16, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 4))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class Conv2dSame(nn.Conv2d):
    """A "same" convolution that pads itself and calls F.conv2d on its own weight."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((ih - 1) // self.stride[0] * self.stride[0] + kh - ih, 0)
        pad_w = max((iw - 1) // self.stride[1] * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        hidden = cin * 4
        self._expand_conv = Conv2dSame(cin, hidden, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, 3, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden)
        self._se_reduce = Conv2dSame(hidden, 4, 1)
        self._se_expand = Conv2dSame(4, hidden, 1)
        self._project_conv = Conv2dSame(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout)
        self._swish = nn.SiLU()  # one activation module, called three times
        self.id_skip = stride == 1 and cin == cout

    def forward(self, inputs, drop_connect_rate=None):
        x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        squeezed = self._se_expand(self._swish(self._se_reduce(F.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            if drop_connect_rate and self.training:
                x = x * (torch.rand(x.shape[0], 1, 1, 1) > drop_connect_rate) / (1 - drop_connect_rate)
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 8, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList([MBConvBlock(8, 8, 1), MBConvBlock(8, 12, 2),
                                      MBConvBlock(12, 12, 1), MBConvBlock(12, 16, 1),
                                      MBConvBlock(16, 16, 1)])
        self._conv_head = Conv2dSame(16, 32, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(32)
        self._swish = nn.SiLU()
        self._fc = nn.Linear(32, 4)
        self.drop_connect_rate = 0.2

    def forward(self, inputs):
        bs = inputs.size(0)  # read at the start, used at the end
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            drop_connect_rate = self.drop_connect_rate * float(idx) / len(self._blocks)
            x = block(x, drop_connect_rate=drop_connect_rate)
        x = self._swish(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).view(bs, -1)
        return self._fc(x)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]):
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth)
                          for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, padding=1, bias=False))
        channels = 8
        for i in range(3):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(3, channels, 4))
            channels += 3 * 4
            self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
            channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, 4)

    def forward(self, x):
        out = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class InceptionModule(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.branch1 = nn.Conv2d(cin, width, 1)
        self.branch3 = nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.branch5 = nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(), nn.Conv2d(width, width, 5, padding=2))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, width, 1))

    def forward(self, x):
        return F.relu(torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.pool(x)], 1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inception3a = InceptionModule(8, 4)
        self.inception3b = InceptionModule(16, 4)
        self.maxpool = nn.MaxPool2d(2)
        self.inception4a = InceptionModule(16, 6)
        self.inception4b = InceptionModule(24, 6)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.inception3b(self.inception3a(F.relu(self.stem(x))))
        x = self.inception4b(self.inception4a(self.maxpool(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def image(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


ZOO = {
    "sequential": plain_cnn,
    "vgg": VGG,
    "resnet": ResNet,
    "mobilenetv2": MobileNetV2,
    "efficientnet": EfficientNet,
    "densenet": DenseNet,
    "inception": Inception,
}

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            num_labels=3, vocab_size=120)
IMAGE_STAGES = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=3)


def hf_model(family: str) -> torch.nn.Module:
    """A tiny randomly initialised ``transformers`` classifier of ``family`` (no download)."""
    import transformers as tf

    configs = {
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, TINY),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, TINY),
        "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaForSequenceClassification, TINY),
        "distilbert": (tf.DistilBertConfig, tf.DistilBertForSequenceClassification,
                       dict(dim=32, n_layers=4, n_heads=2, hidden_dim=64, num_labels=3, vocab_size=120)),
        "albert": (tf.AlbertConfig, tf.AlbertForSequenceClassification, dict(TINY, embedding_size=16)),
        "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification, dict(TINY, embedding_size=16)),
        "mpnet": (tf.MPNetConfig, tf.MPNetForSequenceClassification, TINY),
        "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification, TINY),
        "modernbert": (tf.ModernBertConfig, tf.ModernBertForSequenceClassification,
                       dict(TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                            sep_token_id=2, global_attn_every_n_layers=2, local_attention=8)),
        "vit": (tf.ViTConfig, tf.ViTForImageClassification,
                dict(TINY, image_size=16, patch_size=4)),
        "convnext": (tf.ConvNextConfig, tf.ConvNextForImageClassification, IMAGE_STAGES),
        "hf-resnet": (tf.ResNetConfig, tf.ResNetForImageClassification,
                      dict(IMAGE_STAGES, embedding_size=8)),
    }
    config, model, kwargs = configs[family]
    torch.manual_seed(0)
    return model(config(**kwargs)).eval()


TEXT_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet",
                 "deberta-v2", "modernbert")
IMAGE_FAMILIES = ("vit", "convnext", "hf-resnet")


def encoding(n: int = 6, length: int = 12) -> dict[str, torch.Tensor]:
    """A tokenizer-style batch: input_ids and a padded attention_mask."""
    generator = torch.Generator().manual_seed(n)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, length // 2:] = 0
    return {"input_ids": torch.randint(5, 120, (n, length), generator=generator), "attention_mask": mask}


class EncoderClassifier(nn.Module):
    """A user's own classifier around a Hugging Face encoder: mean pooling and a linear head."""

    def __init__(self):
        super().__init__()
        import transformers as tf

        torch.manual_seed(0)
        self.encoder = tf.MPNetModel(tf.MPNetConfig(**{k: v for k, v in TINY.items() if k != "num_labels"}),
                                     add_pooling_layer=False)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


DECODER_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
DECODER_VOCAB = 211


def decoder_lm(family: str, seed: int = 0, layers: int = 6) -> torch.nn.Module:
    """A tiny randomly initialised ``transformers`` decoder LM of ``family`` (no download):
    hidden 64, 4 heads (2 KV heads where the family has grouped queries), vocab 211."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=DECODER_VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, eos_token_id=DECODER_VOCAB - 1,
                  bos_token_id=0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=True))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **common, sliding_window=None))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=DECODER_VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
            eos_token_id=DECODER_VOCAB - 1, bos_token_id=0))
    else:
        raise ValueError(f"unknown decoder family {family!r}; families: {DECODER_FAMILIES}")
    return model.eval()
