"""Networks built from registered mechanisms: Block, Transformer and its LM/classifier heads; DCAL; DiT; VISOR; L-SFAN; HTR-JAND; Edge-MoE/M3ViT; MEDUSA; ReJSHand; multi-scale self-guided attention (MSGA) and its U-Net baseline."""
from attnlab.models.dcal import (DCALBlock, DCALClassifier, DCALOutput, DCALTransformer, GLCABlock,
                                 UncertaintyWeightedLoss, attention_rollout, select_local_queries)
from attnlab.models.dit import DiT, DiTBlock, NoiseSchedule
from attnlab.models.edge_moe import EdgeMoEViT, TaskGate, TaskMoE
from attnlab.models.lsfan import LSFAN, LSFANConvStack, LSFANEncoderLayer, oriented_pool
from attnlab.models.medusa import MedusaNet
from attnlab.models.rejshand import FeatureChatBlock, MLPLifter, ReJSHandLifter
from attnlab.models.htr_jand import HTRJAND, FullGatedConv2d, SqueezeExcitation, error_rates, greedy_decode
from attnlab.models.msga import MSGA, MSGAOutput, msga_loss
from attnlab.models.unet import UNet
from attnlab.models.transformer import Block, CausalLM, Classifier, Mlp, Transformer, parse_layer
from attnlab.models.visor import Visor, VisorClassifier

__all__ = ["Block", "Transformer", "CausalLM", "Classifier", "Mlp", "parse_layer",
           "DCALBlock", "GLCABlock", "DCALTransformer", "DCALOutput", "DCALClassifier", "UncertaintyWeightedLoss",
           "attention_rollout", "select_local_queries", "DiT", "DiTBlock", "NoiseSchedule", "Visor", "VisorClassifier",
           "LSFAN", "LSFANConvStack", "LSFANEncoderLayer", "oriented_pool",
           "HTRJAND", "FullGatedConv2d", "SqueezeExcitation", "greedy_decode", "error_rates",
           "EdgeMoEViT", "TaskMoE", "TaskGate", "MedusaNet", "FeatureChatBlock", "ReJSHandLifter", "MLPLifter",
           "MSGA", "MSGAOutput", "msga_loss", "UNet"]
