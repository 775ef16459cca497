"""Graph passes over captured ``torch.fx.GraphModule``s. One file per pass or small family."""
from .annotate import AnnotatePass
from .convert import ConvertPass
from .fold_bn import FoldBatchNormPass
from .infra import Pass, PassManager, PassResult
from .normalize import NormalizeLinearPass
from .observe import InsertObserversPass
from .recurrent import DecomposeRecurrentPass
from .rotate import RotateResidualPass
from .rotate_inner import OnlineHadamardPass, RotateHeadsPass
from .qat import FreezeQATPass, InsertFakeQuantPass, TrainEvalOpsPass
from .smooth import ApplySmoothingPass, InsertChannelStatsPass
from .weight_algorithms import ApplyWeightAlgorithmPass

__all__ = ["Pass", "PassResult", "PassManager", "FoldBatchNormPass", "NormalizeLinearPass", "DecomposeRecurrentPass", "AnnotatePass",
           "InsertChannelStatsPass", "ApplySmoothingPass", "InsertObserversPass", "ConvertPass",
           "InsertFakeQuantPass", "TrainEvalOpsPass", "FreezeQATPass", "ApplyWeightAlgorithmPass",
           "RotateResidualPass", "RotateHeadsPass", "OnlineHadamardPass"]
