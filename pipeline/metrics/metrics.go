// Package metrics holds one process's Prometheus metrics: a registry of
// its own (never the global one), Go runtime and process collectors,
// gRPC server and client metrics (go-grpc-middleware's prometheus
// provider), and imcloud's own, named as Prometheus recommends
// (imcloud_<stage>_<what>_<unit>). The stages take the part they record
// into; each method is safe on a nil receiver, which records nothing
// (metrics off, and tests).
//
// Label values come only from closed sets — transports, close codes,
// routes, HTTP status codes, results — never from a client's input: no
// room, key or user is a label.
//
// Cost at fan-out: one histogram observation per socket write (packets
// per write) and per message per node (delivery latency), none per
// recipient; BENCHMARKS.md "Metrics on vs off" measures it.
package metrics

import (
	"strconv"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are one process's.
type Metrics struct {
	Registry   *prometheus.Registry
	Cloud      *Cloud
	Logic      *Logic
	Job        *Job
	GRPCServer *grpcprom.ServerMetrics
	GRPCClient *grpcprom.ClientMetrics
}

// New registers the collectors of a process on a registry of its own.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{
		Registry:   reg,
		Cloud:      newCloud(reg),
		Logic:      newLogic(reg),
		Job:        newJob(reg),
		GRPCServer: grpcprom.NewServerMetrics(),
		GRPCClient: grpcprom.NewClientMetrics(),
	}
	reg.MustRegister(m.GRPCServer, m.GRPCClient)
	return m
}

// latencyBuckets span a loopback delivery (a millisecond) to a backlog
// drained after an outage (a minute).
var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// Cloud is what a cloud node records.
type Cloud struct {
	connections       *prometheus.GaugeVec
	connects          prometheus.Counter
	handshakeFailures *prometheus.CounterVec
	closes            *prometheus.CounterVec
	rounds            prometheus.Counter
	packetsPerWrite   prometheus.Histogram
	latency           *prometheus.HistogramVec
	upstream          prometheus.Counter
}

func newCloud(reg prometheus.Registerer) *Cloud {
	c := &Cloud{
		connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "imcloud_cloud_connections",
			Help: "Client connections authenticated and open, by transport."}, []string{"transport"}),
		connects: prometheus.NewCounter(prometheus.CounterOpts{Name: "imcloud_cloud_connects_total",
			Help: "Client connections that authenticated."}),
		handshakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imcloud_cloud_handshake_failures_total",
			Help: "Client connections that did not authenticate, by reason."}, []string{"reason"}),
		closes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imcloud_cloud_closes_total",
			Help: "Client connections the node closed, by close code (1000 also for a client that left)."}, []string{"code"}),
		rounds: prometheus.NewCounter(prometheus.CounterOpts{Name: "imcloud_cloud_fanout_rounds_total",
			Help: "Room fan-out rounds: pushes to a room arriving during one round go together in the next."}),
		packetsPerWrite: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "imcloud_cloud_packets_per_write",
			Help: "Packets a connection's writer put in one socket write.", Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128}}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "imcloud_delivery_latency_seconds",
			Help:    "From logic accepting a push (its clock) to the node queueing it on its connections (this node's clock), per message and node, by kind.",
			Buckets: latencyBuckets}, []string{"kind"}),
		upstream: prometheus.NewCounter(prometheus.CounterOpts{Name: "imcloud_cloud_upstream_messages_total",
			Help: "Messages clients sent (op 4) that the broker took."}),
	}
	reg.MustRegister(c.connections, c.connects, c.handshakeFailures, c.closes, c.rounds, c.packetsPerWrite, c.latency, c.upstream)
	return c
}

// Opened counts a connection that authenticated on transport.
func (c *Cloud) Opened(transport string) {
	if c == nil {
		return
	}
	c.connects.Inc()
	c.connections.WithLabelValues(transport).Inc()
}

// Ended counts a connection of transport that ended.
func (c *Cloud) Ended(transport string) {
	if c == nil {
		return
	}
	c.connections.WithLabelValues(transport).Dec()
}

// HandshakeFailed counts a connection that did not authenticate; reason is
// one of a closed set the caller maps errors to.
func (c *Cloud) HandshakeFailed(reason string) {
	if c == nil {
		return
	}
	c.handshakeFailures.WithLabelValues(reason).Inc()
}

// Closed counts a close the node sent with code.
func (c *Cloud) Closed(code int) {
	if c == nil {
		return
	}
	c.closes.WithLabelValues(closeCode(code)).Inc()
}

// Round counts a room fan-out round.
func (c *Cloud) Round() {
	if c == nil {
		return
	}
	c.rounds.Inc()
}

// Wrote records the packets of one socket write.
func (c *Cloud) Wrote(packets int) {
	if c == nil {
		return
	}
	c.packetsPerWrite.Observe(float64(packets))
}

// Queued records a message of kind (room, user, broadcast) queued on the
// node's connections, accepted by logic at acceptedUnixNano (0: unknown,
// not recorded).
func (c *Cloud) Queued(kind string, acceptedUnixNano int64) {
	if c == nil || acceptedUnixNano <= 0 {
		return
	}
	d := time.Since(time.Unix(0, acceptedUnixNano))
	if d < 0 {
		d = 0 // clocks of two machines
	}
	c.latency.WithLabelValues(kind).Observe(d.Seconds())
}

// Upstream counts an op 4 message the broker took.
func (c *Cloud) Upstream() {
	if c == nil {
		return
	}
	c.upstream.Inc()
}

// closeCode is code as a label: the codes the node sends, or "other".
func closeCode(code int) string {
	switch code {
	case 1000, 1001, 1002, 1006, 1008, 1009, 1011, 1013, 4008, 4009, 4029, 4401, 4403, 4422, 4503:
		return strconv.Itoa(code)
	}
	return "other"
}

// Logic is what the push API records.
type Logic struct {
	pushes  *prometheus.CounterVec
	publish prometheus.Histogram
}

func newLogic(reg prometheus.Registerer) *Logic {
	l := &Logic{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imcloud_logic_pushes_total",
			Help: "Push requests answered, by route (keys, mids, room, all; batch for a batch refused whole or an item naming no route) and HTTP status; each item of a batch counts under its route."}, []string{"route", "code"}),
		publish: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "imcloud_logic_publish_seconds",
			Help: "Publishing a push's messages to the broker (confirmed where the broker confirms).", Buckets: latencyBuckets}),
	}
	reg.MustRegister(l.pushes, l.publish)
	return l
}

// Push counts a push request on route answered with code.
func (l *Logic) Push(route string, code int) {
	if l == nil {
		return
	}
	l.pushes.WithLabelValues(route, strconv.Itoa(code)).Inc()
}

// Published records one publish to the broker.
func (l *Logic) Published(d time.Duration) {
	if l == nil {
		return
	}
	l.publish.Observe(d.Seconds())
}

// Job results, the label values of imcloud_job_deliveries_total.
const (
	Delivered = "delivered" // every node holding a recipient took it
	Retried   = "retried"   // an attempt failed and is retried
	Offline   = "offline"   // given up: recipients stayed offline (poison topic)
	Poisoned  = "poisoned"  // given up for another reason (poison topic)
	Duplicate = "duplicate" // dropped: delivered before (job.dedupe)
)

// Job is what job records.
type Job struct {
	results *prometheus.CounterVec
}

func newJob(reg prometheus.Registerer) *Job {
	j := &Job{results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "imcloud_job_deliveries_total",
		Help: "Messages job handled, by result: delivered, retried (per retry), offline, poisoned, duplicate."}, []string{"result"})}
	for _, r := range []string{Delivered, Retried, Offline, Poisoned, Duplicate} {
		j.results.WithLabelValues(r) // present at 0 from the start
	}
	reg.MustRegister(j.results)
	return j
}

// Result counts a message's result; a nil Job records nothing.
func (j *Job) Result(result string) {
	if j == nil {
		return
	}
	j.results.WithLabelValues(result).Inc()
}

// CloudPart is m's Cloud, nil when m is: the stage then records nothing.
func (m *Metrics) CloudPart() *Cloud {
	if m == nil {
		return nil
	}
	return m.Cloud
}

// LogicPart is m's Logic, nil when m is.
func (m *Metrics) LogicPart() *Logic {
	if m == nil {
		return nil
	}
	return m.Logic
}

// JobPart is m's Job, nil when m is.
func (m *Metrics) JobPart() *Job {
	if m == nil {
		return nil
	}
	return m.Job
}
