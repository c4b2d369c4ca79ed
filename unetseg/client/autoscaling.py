"""Scale an asynchronous endpoint to zero instances when it has nothing to do, and back out when a request comes. No
torch.

Only asynchronous endpoints can go to 0 instances (requests wait in the endpoint's queue meanwhile); a real-time
endpoint keeps at least one. The setup is AWS's own (SageMaker developer guide, "Autoscale an asynchronous
endpoint"), made of four requests:

1. Application Auto Scaling RegisterScalableTarget: the variant's DesiredInstanceCount may go from 0 (MinCapacity) to
   `max_instances`;
2. a target-tracking policy on the endpoint's ApproximateBacklogSizePerInstance (queued requests per instance): it adds
   instances while the backlog per instance is over `backlog_per_instance` and removes them, down to 0, as the queue
   drains;
3. a step-scaling policy that adds one instance, and
4. a CloudWatch alarm on HasBacklogWithoutCapacity (1 while requests wait and no instance runs) that triggers it. The
   target-tracking policy alone would never leave 0: a backlog divided by 0 instances is no number it can track.

The endpoint must be InService before RegisterScalableTarget. From 0, the first answer takes the alarm's 2 minutes
plus the instance's start (typically 5-10 minutes for a GPU instance and this image): the price of paying nothing while
idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .job_rules import JobSettingsError, is_whole

NAMESPACE = "sagemaker"  # Application Auto Scaling's ServiceNamespace for SageMaker endpoints
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC_NAMESPACE = "AWS/SageMaker"
BACKLOG_METRIC = "ApproximateBacklogSizePerInstance"
NO_CAPACITY_METRIC = "HasBacklogWithoutCapacity"
DEFAULT_VARIANT = "AllTraffic"  # the SDK's name for a deployed model's one variant


@dataclass(frozen=True)
class ScaleToZero:
    """What enable_scale_to_zero created: the names to look for in the consoles, and to remove."""

    resource_id: str
    target_tracking_policy: str
    step_policy: str
    step_policy_arn: str
    alarm: str


def resource_id(endpoint_name: str, variant: str = DEFAULT_VARIANT) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def enable_scale_to_zero(session: Any, endpoint_name: str, *, max_instances: int = 1, variant: str = DEFAULT_VARIANT,
                         backlog_per_instance: float = 5.0, scale_in_cooldown_s: int = 600,
                         scale_out_cooldown_s: int = 300) -> ScaleToZero:
    """Let the async endpoint's variant scale between 0 and `max_instances` instances (see the module's docstring).

    `backlog_per_instance`: the queued requests per instance that the target-tracking policy keeps to (more: it adds
    instances). `scale_in_cooldown_s`: how long after a scale-in before the next (the last instance goes only after
    the queue has been empty this long). `scale_out_cooldown_s`: between scale-outs, and for the scale-out from 0.
    `session`: a sagemaker.Session (its boto session and region are used). Calling it again updates the same policies
    and alarm.
    """
    problems = []
    if not is_whole(max_instances, minimum=1):
        problems.append(f"max_instances={max_instances!r}: use a whole number of instances, 1 or more")
    if isinstance(backlog_per_instance, bool) or not isinstance(backlog_per_instance, (int, float)) \
            or not backlog_per_instance > 0:
        problems.append(f"backlog_per_instance={backlog_per_instance!r}: use a number of queued requests above 0")
    for name, value in (("scale_in_cooldown_s", scale_in_cooldown_s), ("scale_out_cooldown_s", scale_out_cooldown_s)):
        if not is_whole(value, minimum=0):
            problems.append(f"{name}={value!r}: use a whole number of seconds, 0 or more")
    if problems:
        raise JobSettingsError("; ".join(problems))
    if getattr(session, "local_mode", False):
        raise JobSettingsError("a local endpoint does not scale: scale-to-zero is for asynchronous endpoints on "
                               "SageMaker")
    scaling, cloudwatch = _clients(session)
    target = resource_id(endpoint_name, variant)
    common = {"ServiceNamespace": NAMESPACE, "ResourceId": target, "ScalableDimension": SCALABLE_DIMENSION}
    scaling.register_scalable_target(**common, MinCapacity=0, MaxCapacity=int(max_instances))

    dimensions = [{"Name": "EndpointName", "Value": endpoint_name}]
    tracking_name = f"{endpoint_name}-backlog-per-instance"
    scaling.put_scaling_policy(
        **common, PolicyName=tracking_name, PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(backlog_per_instance),
            "CustomizedMetricSpecification": {"MetricName": BACKLOG_METRIC, "Namespace": METRIC_NAMESPACE,
                                              "Dimensions": dimensions, "Statistic": "Average"},
            "ScaleInCooldown": int(scale_in_cooldown_s), "ScaleOutCooldown": int(scale_out_cooldown_s)})

    step_name = f"{endpoint_name}-scale-out-from-zero"
    step = scaling.put_scaling_policy(
        **common, PolicyName=step_name, PolicyType="StepScaling",
        StepScalingPolicyConfiguration={
            "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average",
            "Cooldown": int(scale_out_cooldown_s),
            "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]})

    alarm = f"{endpoint_name}-backlog-without-capacity"
    # Two minutes at 1 (a request waits and nothing runs); a missing datapoint (no requests at all) is not a breach.
    cloudwatch.put_metric_alarm(
        AlarmName=alarm, AlarmDescription=f"Scale {endpoint_name} out from 0 instances when requests wait",
        MetricName=NO_CAPACITY_METRIC, Namespace=METRIC_NAMESPACE, Dimensions=dimensions, Statistic="Average",
        Period=60, EvaluationPeriods=2, DatapointsToAlarm=2, Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold", TreatMissingData="missing",
        AlarmActions=[step["PolicyARN"]])
    return ScaleToZero(target, tracking_name, step_name, step["PolicyARN"], alarm)


def disable_scale_to_zero(session: Any, endpoint_name: str, *, variant: str = DEFAULT_VARIANT,
                          setup: Optional[ScaleToZero] = None) -> None:
    """Remove what enable_scale_to_zero made: the alarm, then the scalable target (which takes its policies with it).
    Before deleting the endpoint; the variant keeps its current instance count."""
    from botocore.exceptions import ClientError

    scaling, cloudwatch = _clients(session)
    alarm = setup.alarm if setup else f"{endpoint_name}-backlog-without-capacity"
    cloudwatch.delete_alarms(AlarmNames=[alarm])
    try:
        scaling.deregister_scalable_target(ServiceNamespace=NAMESPACE, ScalableDimension=SCALABLE_DIMENSION,
                                           ResourceId=setup.resource_id if setup else resource_id(endpoint_name,
                                                                                                   variant))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ObjectNotFoundException":
            raise


def _clients(session: Any) -> tuple[Any, Any]:
    boto_session, region = session.boto_session, session.boto_region_name
    return (boto_session.client("application-autoscaling", region_name=region),
            boto_session.client("cloudwatch", region_name=region))
