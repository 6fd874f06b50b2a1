from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRouteRequest(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: str
    def __init__(self, route: _Optional[str] = ...) -> None: ...

class SetRouteRequest(_message.Message):
    __slots__ = ("route", "yaml")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    route: str
    yaml: str
    def __init__(self, route: _Optional[str] = ..., yaml: _Optional[str] = ...) -> None: ...

class VariantWeight(_message.Message):
    __slots__ = ("variant", "weight_percent")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    weight_percent: float
    def __init__(self, variant: _Optional[str] = ..., weight_percent: _Optional[float] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("route", "policy", "weights", "yaml")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    route: str
    policy: str
    weights: _containers.RepeatedCompositeFieldContainer[VariantWeight]
    yaml: str
    def __init__(self, route: _Optional[str] = ..., policy: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[VariantWeight, _Mapping]]] = ..., yaml: _Optional[str] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("route", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    route: str
    weights: _containers.ScalarMap[str, float]
    def __init__(self, route: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: str
    def __init__(self, route: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("route", "reason")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    route: str
    reason: str
    def __init__(self, route: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("time_s", "route", "action", "from_percent", "to_percent", "reason")
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FROM_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TO_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time_s: float
    route: str
    action: str
    from_percent: float
    to_percent: float
    reason: str
    def __init__(self, time_s: _Optional[float] = ..., route: _Optional[str] = ..., action: _Optional[str] = ..., from_percent: _Optional[float] = ..., to_percent: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class DecisionResponse(_message.Message):
    __slots__ = ("decision", "weights")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    weights: _containers.RepeatedCompositeFieldContainer[VariantWeight]
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., weights: _Optional[_Iterable[_Union[VariantWeight, _Mapping]]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "metric", "clicked", "row")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    CLICKED_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    metric: float
    clicked: _containers.RepeatedScalarFieldContainer[int]
    row: int
    def __init__(self, request_id: _Optional[str] = ..., metric: _Optional[float] = ..., clicked: _Optional[_Iterable[int]] = ..., row: _Optional[int] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("route", "variant", "outcome")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    route: str
    variant: str
    outcome: str
    def __init__(self, route: _Optional[str] = ..., variant: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: str
    def __init__(self, route: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("revision", "json")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    revision: str
    json: str
    def __init__(self, revision: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...
