// Package job consumes PushMsg envelopes from the broker and delivers
// them to cloud nodes over gRPC. It is stateless; any number of jobs share
// the push queue.
package job

import (
	"context"
	"errors"
	"fmt"
	"imcloud/pipeline/metrics"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/stages/internal/cloudconn"
	"imcloud/stages/internal/nodecache"
)

// Nodes lists the live cloud nodes.
type Nodes interface {
	Nodes(ctx context.Context) ([]*pb.NodeInfo, error)
}

// StaticNodes is a fixed node list; each node's id is its address.
type StaticNodes []string

// Nodes implements Nodes.
func (s StaticNodes) Nodes(context.Context) ([]*pb.NodeInfo, error) {
	out := make([]*pb.NodeInfo, len(s))
	for i, a := range s {
		out[i] = &pb.NodeInfo{Id: a, GrpcAddr: a}
	}
	return out, nil
}

// addrs maps the live nodes' ids to their gRPC addresses; given a room,
// only the nodes that host it, where nodes report their rooms.
func (s *Stage) addrs(ctx context.Context, room string) (map[string]string, error) {
	var (
		nodes []*pb.NodeInfo
		err   error
	)
	if room != "" && s.cache != nil {
		// A room's new member was reported before its client was told it
		// joined, so before this push was accepted, so before now: a list
		// current as of now has it. A bundled push's first try takes the
		// bundle's start instead (every push in it was accepted before),
		// so that the bundle's room pushes share one read of a shared
		// registry: started in turn (Start), each asking for a list as of
		// its own start read it once a push, one after another.
		since, ok := pipeline.AttemptStart(ctx)
		if !ok {
			since = time.Now()
		}
		nodes, err = s.cache.NodesSince(ctx, since)
	} else {
		nodes, err = s.list.Nodes(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("list cloud nodes: %w", err)
	}
	return addrMap(nodes, room), nil
}

// addrsWith is addrs for a key push to the nodes ids when the kept node
// list (cache, not nil) lacks one: it is read again, as the node may have
// just registered.
func (s *Stage) addrsWith(ctx context.Context, ids []string) (map[string]string, error) {
	nodes, err := s.cache.NodesWith(ctx, ids)
	if err != nil {
		return nil, fmt.Errorf("list cloud nodes: %w", err)
	}
	return addrMap(nodes, ""), nil
}

func addrMap(nodes []*pb.NodeInfo, room string) map[string]string {
	m := make(map[string]string, len(nodes))
	for _, n := range nodes {
		if room != "" && n.ReportsRooms && n.RoomCount[room] == 0 {
			continue
		}
		m[n.Id] = n.GrpcAddr
	}
	return m
}

// KeyLocator finds the node each key is connected to now; a registry
// shared with logic is one. Without it, keys are looked for only on the
// node logic resolved when it accepted the push.
type KeyLocator interface {
	ServersByKeys(ctx context.Context, keys []string) (map[string]string, error)
}

// MidLocator finds each user's keys and their nodes now; a registry
// shared with logic is one.
type MidLocator interface {
	KeysByMids(ctx context.Context, mids []int64) (map[int64]map[string]string, error)
}

// roomQueueBatch is the least a room queue sends in one call.
const roomQueueBatch = 256

// Stage delivers pushes to cloud nodes.
type Stage struct {
	nodes   Nodes
	list    Nodes            // nodes, or cache
	cache   *nodecache.Cache // nil: nodes read on every push
	locator KeyLocator       // nil when Nodes cannot locate keys
	mids    MidLocator       // nil when Nodes cannot locate users
	logger  *slog.Logger
	rooms   *roomBatcher // nil when room batching is off
	roomq   *roomQueues  // room pushes to each node in order
	clouds  *cloudconn.Pool
	grace   time.Duration
	offline *offlineKeys
	metrics *metrics.Job
	// canaryFails counts the canaries in a row not taken by every node;
	// canaryErr is the last one's error.
	canaryFails atomic.Int64
	canaryErr   atomic.Pointer[string]
}

// Options configure a job stage.
type Options struct {
	Nodes  Nodes
	Logger *slog.Logger
	// BatchWindow and BatchSize gather room messages into one call per
	// node; with a window of 0, room messages still go to each node in
	// order, one call in flight, what waits in the next (up to BatchSize).
	BatchWindow time.Duration
	BatchSize   int
	// Timeout bounds a batch's delivery.
	Timeout time.Duration
	// CloudDial authenticates the calls to cloud nodes (clusterauth).
	CloudDial []grpc.DialOption
	// OfflineGrace is how long a key that was online when logic accepted a
	// push may stay offline at delivery before the push is given up on
	// (job.offline_grace).
	OfflineGrace time.Duration
	// NodesTTL is how long deliveries may use Nodes' list before reading
	// it again; 0: every delivery reads it (a memory registry or a static
	// list, where reading costs nothing). See nodecache for the bound on
	// how late a lapsed node is dropped.
	NodesTTL time.Duration
	// Metrics counts delivered messages; nil records nothing.
	Metrics *metrics.Job
}

// New returns a job stage.
func New(o Options) *Stage {
	s := &Stage{nodes: o.Nodes, logger: o.Logger, clouds: cloudconn.New(o.CloudDial...), grace: o.OfflineGrace, offline: newOfflineKeys(maxOfflineKeys), metrics: o.Metrics}
	s.list = o.Nodes
	if o.NodesTTL > 0 {
		s.cache = nodecache.New(o.Nodes, o.NodesTTL, nil)
		s.list = s.cache
	}
	if l, ok := o.Nodes.(KeyLocator); ok {
		s.locator = l
	}
	if l, ok := o.Nodes.(MidLocator); ok {
		s.mids = l
	}
	// A room's queue sends what waits in calls of up to 256 (or the
	// configured batch size if larger): at 20 a call, one room's queue to
	// a node passed about 20k pushes/s, below what one logic accepts.
	s.roomq = newRoomQueues(max(o.BatchSize, roomQueueBatch), o.Timeout, func(ctx context.Context, addr string, req *pb.BroadcastRoomReq) error {
		c, err := s.clouds.Client(addr)
		if err != nil {
			return err
		}
		_, err = c.BroadcastRoom(ctx, req)
		return err
	})
	if o.BatchWindow > 0 && o.BatchSize > 1 {
		s.rooms = newRoomBatcher(o.BatchWindow, o.BatchSize, o.Timeout, s.deliverRoomBatch)
	}
	return s
}

// AddHandlers subscribes consumers handlers to each of topics (the push
// shards this job consumes) on r. Handlers are named job.push.<i> with
// one topic, as before shards, and job.<topic>.<i> with several.
func (s *Stage) AddHandlers(r *pipeline.Router, sub message.Subscriber, topics []string, consumers int) {
	for _, topic := range topics {
		for i := range consumers {
			name := fmt.Sprintf("job.push.%d", i)
			if len(topics) > 1 {
				name = fmt.Sprintf("job.%s.%d", topic, i)
			}
			r.AddStartingConsumer(name, topic, sub, s.Handle, s.Start)
		}
	}
}

// Close ends the room queues' calls (and waits for their goroutines),
// then closes the connections to cloud nodes.
func (s *Stage) Close() error {
	s.roomq.close()
	return s.clouds.Close()
}

// roomOf is the room a room push goes to, or "" for any other push.
func roomOf(pm *pb.PushMsg) string {
	if pm.Type == pb.PushMsg_ROOM {
		return pm.Room
	}
	return ""
}

// Handle delivers one PushMsg. It fails, so that the message is retried
// and at last poisoned, when any target node could not be reached; but
// when a cloud node refuses the call for this job's own configuration
// (a missing or wrong cluster secret) the error is a pipeline.ConfigError,
// which holds the message instead: the message is not at fault.
func (s *Stage) Handle(msg *message.Message) error {
	return configFault(s.handle(msg))
}

// configKey is what a cloud node's refusal of this job's calls asks to fix.
const configKey = "cluster.secret"

// configFault turns an error that carries a cloud node's Unauthenticated
// or PermissionDenied into a pipeline.ConfigError.
func configFault(err error) error {
	if err == nil || !refused(err) {
		return err
	}
	return &pipeline.ConfigError{Key: configKey, Err: err}
}

// refused reports whether any error in err's tree (joined errors of
// several nodes included) is a gRPC Unauthenticated or PermissionDenied:
// the node refused who called, not what was sent.
func refused(err error) bool {
	if st, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		if c := st.GRPCStatus().Code(); c == codes.Unauthenticated || c == codes.PermissionDenied {
			return true
		}
	}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		if e := u.Unwrap(); e != nil {
			return refused(e)
		}
	case interface{ Unwrap() []error }:
		return slices.ContainsFunc(u.Unwrap(), refused)
	}
	return false
}

// pingTimeout bounds CheckClouds: a Ping is one round trip.
const pingTimeout = 5 * time.Second

// CheckClouds pings every cloud node job knows now (the registry's list or
// job.cloud_addrs) with an authenticated call. A node that refuses the
// call (Unauthenticated, PermissionDenied) means this job's cluster.secret
// is missing or wrong, and job must not start: it would take messages and
// deliver none. A node that cannot be reached is only logged: it may be
// starting or gone, and delivery retries it.
func (s *Stage) CheckClouds(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	nodes, err := s.addrs(ctx, "")
	if err != nil {
		s.logger.Warn("cannot check the cloud nodes at start-up", "err", err)
		return nil
	}
	_, err = s.callNodes(nodes, func(string) bool { return true }, func(c pb.CloudClient) error {
		_, err := c.Ping(ctx, &pb.PingReq{})
		return err
	})
	if err == nil {
		return nil
	}
	if refused(err) {
		return fmt.Errorf("%s: the cloud nodes refuse this job's calls; give it the same cluster.secret (and cluster TLS) as the other nodes: %w", configKey, err)
	}
	s.logger.Warn("some cloud nodes did not answer at start-up", "nodes", len(nodes), "err", err)
	return nil
}

// handle delivers one message; a success is counted delivered (the
// router counts retries, duplicates and what it poisons).
func (s *Stage) handle(msg *message.Message) error {
	pm, err := pipeline.DecodePush(msg)
	if err != nil {
		return err
	}
	return s.counted(s.deliver(msg, pm))
}

// counted counts a delivery's success and hides a canary's.
func (s *Stage) counted(err error) error {
	switch {
	case errors.Is(err, errCanary):
		return nil
	case err == nil:
		s.metrics.Result(metrics.Delivered)
	}
	return err
}

// errCanary says deliver handled a canary: nothing to count.
var errCanary = errors.New("canary")

// Start begins delivering msg and returns a wait for what Handle would
// have returned (pipeline.Starter). A bundle's first tries start one
// after another on the bundle's goroutine, then are waited for: a room
// push only queues its calls to the nodes (roomQueues.start), so it
// needs no goroutine of its own; any other push gets one, as before,
// with its PushMsg already decoded. A goroutine per bundled push, and
// its stack grown in the PushMsg decoder, was 30 % of a standalone
// node's CPU in batches of 100 (pprof, issue 15).
func (s *Stage) Start(msg *message.Message) (wait func() error) {
	pm, err := pipeline.DecodePush(msg)
	if err != nil {
		return func() error { return err }
	}
	if pm.Type == pb.PushMsg_ROOM && s.rooms == nil && !pipeline.IsCanary(pm) && msg.Metadata.Get(pipeline.MetaDeliveredNodes) == "" {
		ctx := msg.Context()
		nodes, err := s.addrs(ctx, pm.Room)
		if err != nil {
			return func() error { return configFault(err) }
		}
		sent := s.startRoomNodes(ctx, msg, pm.Room, nodes, s.proto(msg, pm))
		return func() error { return configFault(s.counted(sent())) }
	}
	done := make(chan error, 1)
	go func() {
		defer func() {
			// A panic is this push's failure, as on the router's own
			// goroutine (its retry meets the Recoverer).
			if p := recover(); p != nil {
				done <- fmt.Errorf("panic delivering %s: %v", msg.UUID, p)
			}
		}()
		done <- configFault(s.counted(s.deliver(msg, pm)))
	}()
	return func() error { return <-done }
}

// proto is the packet a push's calls carry. Every call carries the
// push's stream positions: a room push its room's (a room batch each
// proto its own), a key push its users' (pushKeys narrows them to each
// node's keys where it can).
func (s *Stage) proto(msg *message.Message, pm *pb.PushMsg) *pb.Proto {
	p := &pb.Proto{Ver: 1, Op: pm.Operation, Body: pm.Msg, Id: msg.Metadata.Get(pipeline.MetaMessageID), Positions: pm.Positions}
	// logic's accept time, for the node's delivery-latency histogram.
	p.AcceptedUnixNano, _ = strconv.ParseInt(msg.Metadata.Get(pipeline.MetaPublishedAt), 10, 64)
	return p
}

func (s *Stage) deliver(msg *message.Message, pm *pb.PushMsg) error {
	if pipeline.IsCanary(pm) {
		s.canary(msg)
		return errCanary
	}
	ctx := msg.Context()
	nodes, err := s.addrs(ctx, roomOf(pm))
	if err != nil {
		return err
	}
	p := s.proto(msg, pm)
	switch pm.Type {
	case pb.PushMsg_PUSH:
		return s.pushKeys(ctx, msg, pm, p, nodes)
	case pb.PushMsg_ROOM:
		// A retry or replay has nodes to skip: it goes alone.
		if s.rooms != nil && msg.Metadata.Get(pipeline.MetaDeliveredNodes) == "" {
			return s.rooms.add(ctx, pm.Room, p, msg)
		}
		return s.roomNodes(ctx, msg, pm.Room, nodes, p)
	case pb.PushMsg_BROADCAST:
		return s.eachNode(msg, nodes, func(c pb.CloudClient) error {
			_, err := c.Broadcast(ctx, &pb.BroadcastReq{Proto: p, Speed: pm.Speed})
			return err
		})
	default:
		return fmt.Errorf("unknown push type %v", pm.Type)
	}
}

// eachNode calls every node concurrently and joins their errors. The nodes
// that succeeded are recorded in the message's metadata, which a retry and
// a poisoned message's replay carry: they call only the nodes that failed,
// so one dead node does not repeat a room push on every healthy one.
func (s *Stage) eachNode(msg *message.Message, nodes map[string]string, call func(pb.CloudClient) error) error {
	done := map[string]bool{}
	for _, id := range strings.Split(msg.Metadata.Get(pipeline.MetaDeliveredNodes), ",") {
		done[id] = true
	}
	ok, err := s.callNodes(nodes, func(id string) bool { return !done[id] }, call)
	markDelivered(msg, ok)
	return err
}

// roomNodes sends a room push as startRoomNodes starts it, and waits.
func (s *Stage) roomNodes(ctx context.Context, msg *message.Message, room string, nodes map[string]string, p *pb.Proto) error {
	return s.startRoomNodes(ctx, msg, room, nodes, p)()
}

// startRoomNodes queues a room push for every node not yet reached (a
// retry or replay skips those its metadata lists) in the per-node
// queues, in order, and returns at once; its wait waits for the nodes
// (or ctx) and records those that took it.
func (s *Stage) startRoomNodes(ctx context.Context, msg *message.Message, room string, nodes map[string]string, p *pb.Proto) (wait func() error) {
	done := strings.Split(msg.Metadata.Get(pipeline.MetaDeliveredNodes), ",")
	targets := make(map[string]string, len(nodes))
	for id, addr := range nodes {
		if !slices.Contains(done, id) {
			targets[id] = addr
		}
	}
	sent := s.roomq.start(room, targets, []*pb.Proto{p})
	return func() error {
		oks, err := sent(ctx)
		markDelivered(msg, oks[0])
		return err
	}
}

// markDelivered adds nodes to the ones msg has reached.
func markDelivered(msg *message.Message, nodes []string) {
	if len(nodes) == 0 {
		return
	}
	if prev := msg.Metadata.Get(pipeline.MetaDeliveredNodes); prev != "" {
		nodes = append([]string{prev}, nodes...)
	}
	msg.Metadata.Set(pipeline.MetaDeliveredNodes, strings.Join(nodes, ","))
}

// callNodes calls the chosen nodes concurrently; it returns the ones that
// succeeded and the others' errors joined.
func (s *Stage) callNodes(nodes map[string]string, chosen func(id string) bool, call func(pb.CloudClient) error) ([]string, error) {
	ids := slices.DeleteFunc(slices.Sorted(maps.Keys(nodes)), func(id string) bool { return !chosen(id) })
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		c, err := s.clouds.Client(nodes[id])
		if err != nil {
			errs[i] = err
			continue
		}
		wg.Go(func() {
			if err := call(c); err != nil {
				errs[i] = fmt.Errorf("cloud %s: %w", id, err)
			}
		})
	}
	wg.Wait()
	var ok []string
	for i, id := range ids {
		if errs[i] == nil {
			ok = append(ok, id)
		}
	}
	return ok, errors.Join(errs...)
}

// deliverRoomBatch sends a room's gathered messages to every node in one
// call each; every message records the nodes that took the batch.
func (s *Stage) deliverRoomBatch(ctx context.Context, room string, items []*batchItem) error {
	nodes, err := s.addrs(ctx, room)
	if err != nil {
		return err
	}
	batch := make([]*pb.Proto, len(items))
	for i, it := range items {
		batch[i] = it.proto
	}
	// Through the room's queue to each node, as single room pushes go:
	// one call in flight per room and node, so batches reach a node in
	// the order they filled.
	oks, err := s.roomq.sendAll(ctx, room, nodes, batch)
	for i, it := range items {
		it.withMsg(func(m *message.Message) { markDelivered(m, oks[i]) })
	}
	return err
}

// canary sends a canary to every live cloud node, hosting anything or
// not: each records that the pipeline reached it. A node that does not
// answer is not retried: the next canary, a few seconds on, asks again,
// and its absence is what the node's readiness reports.
func (s *Stage) canary(msg *message.Message) {
	ctx := msg.Context()
	nodes, err := s.list.Nodes(ctx)
	if err != nil {
		s.logger.Debug("canary: list cloud nodes", "err", err)
		return
	}
	p := &pb.Proto{Ver: 1, Op: 1000, Id: msg.Metadata.Get(pipeline.MetaMessageID)}
	p.AcceptedUnixNano, _ = strconv.ParseInt(msg.Metadata.Get(pipeline.MetaPublishedAt), 10, 64)
	if _, err := s.callNodes(addrMap(nodes, ""), func(string) bool { return true }, func(c pb.CloudClient) error {
		_, err := c.BroadcastRoom(ctx, &pb.BroadcastRoomReq{RoomId: pipeline.CanaryRoom, Proto: p})
		return err
	}); err != nil {
		s.canaryFails.Add(1)
		s.canaryErr.Store(new(err.Error()))
		s.logger.Debug("canary not taken by every node", "err", err)
		return
	}
	s.canaryFails.Store(0)
}

// CanaryFailures is how many canaries in a row this job could not hand
// to every cloud node, and the last one's error: a job that reaches no
// node (or not all) takes messages it cannot deliver.
func (s *Stage) CanaryFailures() (int64, string) {
	n := s.canaryFails.Load()
	if n == 0 {
		return 0, ""
	}
	return n, *s.canaryErr.Load()
}
