// Package config defines imcloud's configuration, its defaults, and how a
// file, the environment and command-line overrides are merged and checked.
package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/knadh/koanf/parsers/toml/v2"
	"github.com/knadh/koanf/providers/confmap"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/providers/structs"
	"github.com/knadh/koanf/v2"
)

// Stage names.
const (
	StageLogic = "logic"
	StageJob   = "job"
	StageCloud = "cloud"
)

// Broker kinds.
const (
	BrokerAMQP        = "amqp"
	BrokerGoChannel   = "gochannel"
	BrokerNATS        = "nats"
	BrokerRedisStream = "redisstream"
)

// Registry kinds.
const (
	RegistryMemory = "memory"
	RegistryRedis  = "redis"
)

// Dedupe stores.
const (
	DedupeMemory = "memory"
	DedupeRedis  = "redis"
)

// Auth modes.
const (
	AuthJWT          = "jwt"
	AuthInsecureJSON = "insecure-json"
)

// EnvPrefix starts every environment variable imcloud reads.
const EnvPrefix = "IMCLOUD_"

// Config is the whole configuration of one imcloud process.
type Config struct {
	Stages   []string `koanf:"stages"`
	NodeID   string   `koanf:"node_id"`
	Log      Log      `koanf:"log"`
	Admin    Admin    `koanf:"admin"`
	Broker   Broker   `koanf:"broker"`
	Registry Registry `koanf:"registry"`
	Topics   Topics   `koanf:"topics"`
	Logic    Logic    `koanf:"logic"`
	Job      Job      `koanf:"job"`
	Cloud    Cloud    `koanf:"cloud"`
	Cluster  Cluster  `koanf:"cluster"`
	Events   Events   `koanf:"events"`
	History  History  `koanf:"history"`

	// ignoredEnv are IMCLOUD_ variables that name no key: not
	// IMCLOUD_<SECTION>__<KEY> nor a top-level key (Kubernetes' service
	// links for a Service named imcloud). Exposures warns of them.
	ignoredEnv []string
}

// Events configures the events topic (topics.events): receipts and
// presence, best-effort (see pipeline/events).
type Events struct {
	// Enabled publishes events; off, no event is built or queued.
	Enabled bool `koanf:"enabled"`
	// Kinds lists the kinds published: connect, disconnect, delivered,
	// offline, acked.
	Kinds []string `koanf:"kinds"`
	// Buffer bounds the events queued per process before they are
	// published; past it events are dropped and counted (never waited
	// for: an event must not slow a delivery).
	Buffer int `koanf:"buffer"`
}

// EventKinds are the event kinds events.kinds accepts.
func EventKinds() []string { return []string{"connect", "disconnect", "delivered", "offline", "acked"} }

// Cluster authenticates the internal gRPC calls between logic, job and
// cloud: a shared secret sent with every call, mutual TLS, or both.
type Cluster struct {
	// Secret is sent by every internal gRPC client and checked by logic's
	// and cloud's gRPC servers; the same on every node.
	Secret string `koanf:"secret"`
	// TLSCertFile and TLSKeyFile are this node's certificate, presented
	// both as a gRPC server and as a client; TLSCAFile is the CA that
	// signs every node's certificate. All three or none.
	TLSCertFile string `koanf:"tls_cert_file"`
	TLSKeyFile  string `koanf:"tls_key_file"`
	TLSCAFile   string `koanf:"tls_ca_file"`
}

// MTLS reports whether internal gRPC uses mutual TLS.
func (c Cluster) MTLS() bool { return c.TLSCertFile != "" && c.TLSKeyFile != "" && c.TLSCAFile != "" }

// Authenticated reports whether internal gRPC calls are authenticated.
func (c Cluster) Authenticated() bool { return c.Secret != "" || c.MTLS() }

// MinClusterSecret is the shortest cluster.secret accepted: 16 characters
// (128 bits as hex would be 32; 16 random characters still resist guessing
// over the network, a short word does not).
const MinClusterSecret = 16

// MinJWTSecret is the shortest HS256 client-token secret Exposures does
// not warn about: RFC 7518 §3.2 asks for a key as long as the hash, 32
// bytes for HS256.
const MinJWTSecret = 32

// MinAPIKey is the shortest entry accepted in logic.api_keys: an empty key
// would let "Authorization: Bearer " through, and a short one can be
// guessed over the network; 16 characters as for the cluster secret.
const MinAPIKey = 16

// Log configures the process logger.
type Log struct {
	Level  string `koanf:"level"`
	Format string `koanf:"format"`
}

// Admin configures the operations listener.
type Admin struct {
	Addr string `koanf:"addr"`
	// Metrics records Prometheus metrics and serves them at /metrics on
	// Addr; off (or no Addr), nothing is recorded.
	Metrics bool `koanf:"metrics"`
}

// Broker selects and configures the message broker.
type Broker struct {
	Kind        string      `koanf:"kind"`
	GoChannel   GoChannel   `koanf:"gochannel"`
	AMQP        AMQP        `koanf:"amqp"`
	NATS        NATS        `koanf:"nats"`
	RedisStream RedisStream `koanf:"redisstream"`
}

// GoChannel configures the embedded broker.
type GoChannel struct {
	// MaxPending bounds the messages published and not yet acked, held in
	// memory (about 8 KB each besides the body); past it a publish is
	// refused (503 from the push API).
	MaxPending int `koanf:"max_pending"`
	// MaxPoisoned bounds the poisoned messages the embedded broker keeps
	// in memory for the admin listener's /poison (with
	// topics.poison_max_length, the smaller one); when full, the oldest
	// goes for each new one. 10,000 holds about 9 MB with 100-byte
	// pushes (0.9 KB each, measured) and under 50 MB at
	// logic.max_message_bytes: a standalone process's poison is looked
	// at by hand, and hours of one client's "recipients offline" pushes
	// fit.
	MaxPoisoned int `koanf:"max_poisoned"`
}

// AMQP configures the RabbitMQ broker.
type AMQP struct {
	URL string `koanf:"url"`
	// Channels is how many confirm-mode channels a publisher spreads its
	// messages over; confirms are pipelined on each.
	Channels int `koanf:"channels"`
	// Prefetch is how many unacked messages one consumer holds, and so how
	// many a job handles at once per consumer.
	Prefetch int `koanf:"prefetch"`
	// RedeliverAfter is how long a delivery may stay unsettled before the
	// subscriber gives it back to the queue for another job, its handler
	// presumed stuck (settle's ack timeout). Without it a stuck delivery
	// waits for RabbitMQ's consumer_timeout (30 min by default), which
	// closes the whole channel: keep it below that. It must exceed job's
	// worst case on one message, as for NATS.
	RedeliverAfter time.Duration `koanf:"redeliver_after"`
}

// NATS configures the NATS JetStream broker.
type NATS struct {
	URL string `koanf:"url"`
	// Prefetch is how many messages one subscription pulls ahead of its
	// handlers.
	Prefetch int `koanf:"prefetch"`
	// RedeliverAfter is how long a message may stay unacked before
	// JetStream hands it to another job (the consumer's AckWait), its
	// handler presumed dead. It must exceed job's worst case on one
	// message (Config.JobWorstCase), which validation checks.
	RedeliverAfter time.Duration `koanf:"redeliver_after"`
}

// RedisStream configures the Redis Streams broker.
type RedisStream struct {
	Addr string `koanf:"addr"`
	// RedeliverAfter is how long a message may stay pending (unacked)
	// before another job claims it (XAUTOCLAIM's min idle time). It must
	// exceed job's worst case on one message, as for NATS.
	RedeliverAfter time.Duration `koanf:"redeliver_after"`
}

// Registry selects where sessions and nodes are kept.
type Registry struct {
	Kind  string `koanf:"kind"`
	Redis Redis  `koanf:"redis"`
}

// Redis modes (registry.redis.mode).
const (
	RedisSingle   = "single"
	RedisSentinel = "sentinel"
	RedisCluster  = "cluster"
)

// Redis configures the Redis the registry, the idempotency store, job's
// dedupe store and the history share: one server (Addr), a master found
// through Sentinel (Addrs are the sentinels, MasterName the master) or a
// Redis Cluster (Addrs are seed nodes).
type Redis struct {
	Mode string `koanf:"mode"`
	// Addr is the server in single mode; the other modes use Addrs, so
	// that its default cannot leave a sentinel or cluster setup pointing
	// at a stray single server.
	Addr       string   `koanf:"addr"`
	Addrs      []string `koanf:"addrs"`
	MasterName string   `koanf:"master_name"`
	// Username and Password authenticate to the data nodes (ACL; no
	// username is the default user); the sentinel ones to the sentinels,
	// which often have credentials of their own.
	Username         string `koanf:"username"`
	Password         string `koanf:"password"`
	SentinelUsername string `koanf:"sentinel_username"`
	SentinelPassword string `koanf:"sentinel_password"`
	// DB is the database number; a Redis Cluster has only 0.
	DB int `koanf:"db"`
	// Prefix starts every key imcloud writes, so clusters can share a
	// Redis. No braces: imcloud's keys carry their own Redis Cluster
	// hash tags, and a brace in the prefix would move which part of a key
	// picks its slot.
	Prefix string `koanf:"prefix"`
	// TLS, with the sentinels as with the data nodes. The CA file
	// replaces the system's roots; a client certificate is sent when
	// the server asks for one (tls-auth-clients).
	TLS           bool   `koanf:"tls"`
	TLSCAFile     string `koanf:"tls_ca_file"`
	TLSCertFile   string `koanf:"tls_cert_file"`
	TLSKeyFile    string `koanf:"tls_key_file"`
	TLSServerName string `koanf:"tls_server_name"`
	// WaitReplicas is how many replicas must have a push's history
	// positions before it is accepted (Redis WAIT); 0: none, Redis's
	// asynchronous replication as it is. WaitTimeout bounds that wait.
	WaitReplicas int           `koanf:"wait_replicas"`
	WaitTimeout  time.Duration `koanf:"wait_timeout"`
}

// Topics names the broker topics.
type Topics struct {
	Push     string `koanf:"push"`
	Poison   string `koanf:"poison"`
	Upstream string `koanf:"upstream"`
	// Events carries receipts and presence when events.enabled.
	Events string `koanf:"events"`
	// PushMaxLength, PoisonMaxLength and UpstreamMaxLength bound each
	// topic's queue or stream (messages; on RabbitMQ a message carries a
	// batch of pushes). A full one refuses the next publish
	// (pipeline.ErrQueueFull) rather than dropping what it holds.
	PushMaxLength int64 `koanf:"push_max_length"`
	// PushShards spreads pushes over this many queues or streams
	// (PushTopics); a room's pushes all go to one, and a user's to one, so
	// that each keeps its order through the broker. Every process of a
	// cluster must agree on it (checked at start through a shared
	// registry).
	PushShards        int   `koanf:"push_shards"`
	PoisonMaxLength   int64 `koanf:"poison_max_length"`
	UpstreamMaxLength int64 `koanf:"upstream_max_length"`
	EventsMaxLength   int64 `koanf:"events_max_length"`
}

// MaxPushShards bounds topics.push_shards: each shard is a queue or
// stream on the broker, and every job process consumes each of its shards
// with job.concurrency handlers; 1,024 is far past what one broker serves
// well (a RabbitMQ queue is one Erlang process; BENCHMARKS.md has what N
// of them sustain here).
const MaxPushShards = 1024

// PushTopics are the push topic's shards in order: topics.push itself
// when push_shards is 1 (the layout before shards, so that a cluster can
// keep its queue), else topics.push.0 … topics.push.<N-1>.
func (t Topics) PushTopics() []string {
	n := max(t.PushShards, 1)
	if n == 1 {
		return []string{t.Push}
	}
	out := make([]string, n)
	for i := range out {
		out[i] = t.Push + "." + strconv.Itoa(i)
	}
	return out
}

// JobTopics are the push shards a job consumes: those job.shards lists,
// or all.
func (c Config) JobTopics() []string {
	all := c.Topics.PushTopics()
	if len(c.Job.Shards) == 0 {
		return all
	}
	out := make([]string, 0, len(c.Job.Shards))
	for _, i := range c.Job.Shards {
		if i >= 0 && i < len(all) {
			out = append(out, all[i])
		}
	}
	return out
}

// MaxLengths maps each topic to its length limit; each push shard holds
// push_max_length.
func (t Topics) MaxLengths() map[string]int64 {
	m := map[string]int64{t.Poison: t.PoisonMaxLength, t.Upstream: t.UpstreamMaxLength, t.Events: t.EventsMaxLength}
	for _, p := range t.PushTopics() {
		m[p] = t.PushMaxLength
	}
	return m
}

// Logic configures the logic stage.
type Logic struct {
	HTTPAddr string `koanf:"http_addr"`
	GRPCAddr string `koanf:"grpc_addr"`
	// APIGRPCAddr serves the push API over gRPC (imcloud.api.v1,
	// proto/api.proto) for backends; "" (the default) serves none.
	APIGRPCAddr string `koanf:"api_grpc_addr"`
	// APIStreamWindow bounds the pushes of one PushStream that are
	// received and not yet answered.
	APIStreamWindow int      `koanf:"api_stream_window"`
	APIKeys         []string `koanf:"api_keys"`
	MaxMessageBytes int      `koanf:"max_message_bytes"`
	// MaxBatchItems and MaxBatchBytes bound one POST /im/push/batch (and
	// one gRPC PushBatch): past either the request is refused whole (413).
	MaxBatchItems int `koanf:"max_batch_items"`
	MaxBatchBytes int `koanf:"max_batch_bytes"`
	// SessionTTL bounds how long a session lives without a heartbeat.
	SessionTTL time.Duration `koanf:"session_ttl"`
	// IdempotencyTTL is how long a reply to a request with an
	// Idempotency-Key is kept to answer its retries.
	IdempotencyTTL time.Duration `koanf:"idempotency_ttl"`
	Auth           Auth          `koanf:"auth"`
	// AllowAnonymous lets the push API listen beyond loopback with no
	// api_keys; without it such a configuration is refused.
	AllowAnonymous bool `koanf:"allow_anonymous"`
	// CORSOrigins are the web origins ("https://app.example.com") whose
	// pages may call the push API from a browser (with an API key);
	// empty: none. /im/nodes/weighted, which needs no key, answers any.
	CORSOrigins []string `koanf:"cors_origins"`
	// ReadTimeout bounds reading one request, headers and body: a caller
	// that trickles its body is cut off.
	ReadTimeout time.Duration `koanf:"read_timeout"`
	// WriteTimeout bounds a request from the end of its headers to the end
	// of the reply, publishing included.
	WriteTimeout time.Duration `koanf:"write_timeout"`
	// IdleTimeout closes a keep-alive connection idle this long.
	IdleTimeout time.Duration `koanf:"idle_timeout"`
	// MaxHeaderBytes bounds the request line (query string included) and
	// headers.
	MaxHeaderBytes int `koanf:"max_header_bytes"`

	// IdempotencyMaxBytes bounds the in-memory idempotency store
	// (registry.kind = "memory"); past it the oldest replies are forgotten.
	IdempotencyMaxBytes int `koanf:"idempotency_max_bytes"`
	// ConnectRate and ConnectBurst bound the connects (successful auths)
	// per user (per key for a guest of mid 0): one token reconnecting in a
	// loop made 70,122 connections in 20 s, each a registry write and
	// delete. 0 = no limit.
	ConnectRate  float64 `koanf:"connect_rate"`
	ConnectBurst int     `koanf:"connect_burst"`
	// MaxSessionsPerMid bounds a user's concurrent sessions (keys online
	// at once); guests of mid 0 are not counted. 0 = no limit.
	MaxSessionsPerMid int `koanf:"max_sessions_per_mid"`
}

// Auth configures how logic authenticates clients.
type Auth struct {
	Mode             string `koanf:"mode"`
	JWTSecret        string `koanf:"jwt_secret"`
	JWTPublicKeyFile string `koanf:"jwt_public_key_file"`
}

// Job configures the job stage.
type Job struct {
	Concurrency     int           `koanf:"concurrency"`
	RoomBatchSize   int           `koanf:"room_batch_size"`
	RoomBatchWindow time.Duration `koanf:"room_batch_window"`
	Timeout         time.Duration `koanf:"timeout"`
	// Throttle caps messages handled per second by one job; 0 is no cap.
	Throttle int    `koanf:"throttle"`
	Retry    Retry  `koanf:"retry"`
	Dedupe   Dedupe `koanf:"dedupe"`
	// CloudAddrs lists cloud gRPC addresses for a job that cannot read the
	// node list from a shared registry (logic in another process with the
	// memory registry). Each node's id is its address.
	CloudAddrs []string `koanf:"cloud_addrs"`
	// OfflineGrace is how long job holds and retries a push to keys that
	// were online when logic accepted it but are not connected at delivery
	// (their node restarted and they have not reconnected yet); after it
	// the push goes to the poison topic as "recipients offline". 0 sends
	// it there at once. The held message stays unacked: the grace counts
	// in job's worst case on one message (JobWorstCase).
	OfflineGrace time.Duration `koanf:"offline_grace"`
	// CanaryInterval is how often each job publishes a canary through
	// the push topic to every cloud node; a node that has seen none for
	// three intervals is not ready. 0 turns it off.
	CanaryInterval time.Duration `koanf:"canary_interval"`
	// Shards are the push topic's shards this job consumes (indexes in
	// 0 … topics.push_shards-1); empty: all of them. Jobs consuming the
	// same shard share its messages.
	Shards []int `koanf:"shards"`
}

// Retry configures job's retry middleware.
type Retry struct {
	MaxRetries      int           `koanf:"max_retries"`
	InitialInterval time.Duration `koanf:"initial_interval"`
	MaxInterval     time.Duration `koanf:"max_interval"`
	Multiplier      float64       `koanf:"multiplier"`
}

// Dedupe configures job's deduplication middleware.
type Dedupe struct {
	Enabled bool          `koanf:"enabled"`
	TTL     time.Duration `koanf:"ttl"`
	// Store is "memory" (one job) or "redis" (several jobs share what was
	// delivered; uses registry.redis).
	Store string `koanf:"store"`
}

// Cloud configures the cloud stage.
type Cloud struct {
	TCPAddr        string   `koanf:"tcp_addr"`
	WSAddr         string   `koanf:"ws_addr"`
	WSSAddr        string   `koanf:"wss_addr"`
	GRPCAddr       string   `koanf:"grpc_addr"`
	AdvertiseAddr  string   `koanf:"advertise_addr"`
	LogicAddr      string   `koanf:"logic_addr"`
	TLSCertFile    string   `koanf:"tls_cert_file"`
	TLSKeyFile     string   `koanf:"tls_key_file"`
	AllowedOrigins []string `koanf:"allowed_origins"`
	// Demo serves the live demo page (/demo) on the WebSocket listener.
	Demo              bool          `koanf:"demo"`
	HandshakeTimeout  time.Duration `koanf:"handshake_timeout"`
	HeartbeatInterval time.Duration `koanf:"heartbeat_interval"`
	MaxBodyBytes      int           `koanf:"max_body_bytes"`
	SendQueue         int           `koanf:"send_queue"`
	Buckets           int           `koanf:"buckets"`
	RenewInterval     time.Duration `koanf:"renew_interval"`
	// PublicHost is the host clients reach this node at, as
	// /im/nodes/weighted lists it; empty = advertise_addr's host.
	PublicHost string `koanf:"public_host"`
	// Weight is this node's relative share of new clients.
	Weight int `koanf:"weight"`
	// UpstreamRate and UpstreamBurst limit op 4 messages per connection
	// (messages per second; 0 = unlimited).
	UpstreamRate  float64 `koanf:"upstream_rate"`
	UpstreamBurst int     `koanf:"upstream_burst"`
	// ParkIdle lets idle connections wait without a reader goroutine
	// (Linux; TLS connections always keep theirs).
	ParkIdle bool `koanf:"park_idle"`
	// Sndbuf and Rcvbuf set each client socket's kernel buffers in bytes
	// (0 = the OS default); small buffers bound memory per connection.
	Sndbuf int `koanf:"sndbuf"`
	Rcvbuf int `koanf:"rcvbuf"`
	// DedupeTTL is how long a node remembers delivered message ids; it
	// must exceed job's worst case on one message (JobWorstCase), which
	// validation checks where job runs.
	DedupeTTL time.Duration `koanf:"dedupe_ttl"`
	// DrainTimeout bounds how long shutdown waits for queued packets to
	// reach clients.
	DrainTimeout time.Duration `koanf:"drain_timeout"`
	// CanaryTimeout: a node that no job's canary reached for this long is
	// not ready (/readyz); 0 leaves the canary out of readiness (its age
	// is still a metric). Set it above three of the jobs'
	// job.canary_interval, and off where pulling every node from the load
	// balancer at once when delivery stalls is worse than keeping them.
	CanaryTimeout time.Duration `koanf:"canary_timeout"`
	// OrderGapWait is how long a node holds a stream's message that came
	// ahead of its predecessor before fetching the missing ones from
	// logic's history (issue 12): job's concurrent handlers swap two
	// pushes by well under a millisecond, a retry by its backoff.
	OrderGapWait time.Duration `koanf:"order_gap_wait"`
	// SendQueueBytes bounds the bytes queued per connection before it is
	// a slow consumer, as SendQueue bounds its packets.
	SendQueueBytes int `koanf:"send_queue_bytes"`
	// MaxRooms bounds the rooms one connection is in.
	MaxRooms int `koanf:"max_rooms"`
	// MaxAccepts bounds the operations op 14 may subscribe one connection
	// to (beyond those its token lists).
	MaxAccepts int `koanf:"max_accepts"`
	// ClientRate and ClientBurst limit every packet a client sends (per
	// second, per connection); over it the client is closed with 4029.
	ClientRate  float64 `koanf:"client_rate"`
	ClientBurst int     `koanf:"client_burst"`
	// MaxPacedBroadcasts bounds the paced broadcasts (speed > 0) a node
	// runs at once; one over it is refused with RESOURCE_EXHAUSTED and
	// job retries it.
	MaxPacedBroadcasts int `koanf:"max_paced_broadcasts"`
	// MaxPacedDuration bounds how long a paced broadcast runs: a speed
	// too low to reach every connection within it is raised.
	MaxPacedDuration time.Duration `koanf:"max_paced_duration"`
	// MaxConns bounds the client connections (TCP and WebSocket,
	// authenticated or not) open at once; one over it is closed as soon
	// as it is accepted. 0 derives it at start from the descriptor limit,
	// keeping a reserve for the rest of the process.
	MaxConns int `koanf:"max_conns"`
	// MaxHandshakesPerIP bounds one client address's connections that
	// have not authenticated yet (an IPv6 /64 counts as one address).
	MaxHandshakesPerIP int `koanf:"max_handshakes_per_ip"`
}

// History configures what each stream keeps (issue 12): every room and
// every user is a stream, and each class of stream has its limit. A room's
// class is its type, the part of "type://id" before "://"; every user
// stream is of class user.
type History struct {
	// Enabled keeps streams at all. Off, logic gives no positions and
	// keeps no history, as before issue 12: no order promise past job's
	// concurrency and retries, no GET /im/history, no recovery, no acks.
	// It exists to measure what history costs (BENCHMARKS.md, "History
	// on vs off") and for deployments that want the old throughput.
	Enabled bool `koanf:"enabled"`
	// User is the limit of every user stream (mid and key pushes).
	User StreamLimit `koanf:"user"`
	// RoomsDefault is the limit of the rooms whose type Rooms does not
	// name.
	RoomsDefault StreamLimit `koanf:"rooms_default"`
	// Rooms maps a room type to its limit.
	Rooms map[string]StreamLimit `koanf:"rooms"`
	// MaxSize caps every class's size: a stream holds at most MaxSize
	// messages of at most logic.max_message_bytes each, so one stream
	// never holds more than MaxSize × max_message_bytes of bodies (40 MB
	// with the defaults) whatever a class asks for.
	MaxSize int `koanf:"max_size"`
	// MaxStreams and MaxBytes cap the in-memory store (registry.kind
	// memory) as a whole: the number of streams, and the bytes their state
	// and kept messages take. Past either, the least recently pushed-to
	// streams are forgotten (their next message starts a new epoch, which
	// tells clients their history is lost), so a backend pushing to
	// millions of one-off users costs a bounded heap. The Redis store
	// leaves this to Redis's maxmemory. pipeline.HistoryCaps says why the
	// defaults.
	MaxStreams int `koanf:"max_streams"`
	MaxBytes   int `koanf:"max_bytes"`
}

// StreamLimit is what one class of stream keeps: at most Size messages,
// none older than TTL. Size 0 keeps none: the stream still gives
// positions (and so order), but a gap cannot be filled nor a client
// recovered. A stream untouched for TTL is forgotten, positions and
// epoch with it. Size and TTL are pipeline.StreamLimit's (config cannot
// import pipeline: pipeline's tests import config).
type StreamLimit struct {
	Size int           `koanf:"size"`
	TTL  time.Duration `koanf:"ttl"`
	// Acks keeps opted-in clients' acknowledgements (op 23) of the
	// class's streams: a new connection naming no position then gets
	// every unacknowledged message still kept. Only the user class has
	// a cursor per person; a room class refuses it. Off by default: a
	// client that opts in to recovery but never acks would get up to
	// Size messages again on every fresh start.
	Acks bool `koanf:"acks"`
}

// Limit is the limit of a stream named as pipeline names them ("room:" +
// room, "user:" + mid), capped by MaxSize: User for a user stream, the
// room type's in Rooms, else RoomsDefault.
func (h History) Limit(stream string) StreamLimit {
	l := h.RoomsDefault
	if strings.HasPrefix(stream, "user:") {
		l = h.User
	} else if room, ok := strings.CutPrefix(stream, "room:"); ok {
		if typ, _, ok := strings.Cut(room, "://"); ok {
			if rl, ok := h.Rooms[typ]; ok {
				l = rl
			}
		}
	}
	if h.MaxSize > 0 && l.Size > h.MaxSize {
		l.Size = h.MaxSize
	}
	return l
}

// maxRoomType bounds a room type named in history.rooms: a room is at
// most 255 bytes (proto/wire.MaxRoomLen) with "://" and an id.
const maxRoomType = 64

// validRoomType reports whether a history.rooms key can be a room type:
// letters, digits, '_' and '-'. koanf splits keys at '.', so a type with
// one could never be configured; a type with "://" is not a type.
func validRoomType(t string) bool {
	if t == "" || len(t) > maxRoomType {
		return false
	}
	for _, r := range t {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// maxHistorySize bounds history.max_size: 100,000 messages of 4 KB are
// 400 MB for one stream, more than any one stream should hold.
const maxHistorySize = 100_000

// Bounds of history.max_streams and history.max_bytes: fewer than 1,000
// streams or 8 MiB would evict streams in normal use (8 MiB holds one
// stream's 4 MiB history twice); 100 million streams are ~20 GB of
// state, past any one process.
const (
	minHistoryStreams = 1_000
	maxHistoryStreams = 100_000_000
	minHistoryBytes   = 8 << 20
)

// maxThrottle bounds job.throttle (messages per second).
const maxThrottle = 1_000_000

// Default returns the configuration used where nothing overrides it; it is
// what config.example.toml shows.
func Default() Config {
	return Config{
		Stages: []string{StageLogic, StageJob, StageCloud},
		Log:    Log{Level: "info", Format: "text"},
		Admin:  Admin{Addr: "", Metrics: true},
		Broker: Broker{
			Kind:        BrokerAMQP,
			GoChannel:   GoChannel{MaxPending: 50_000, MaxPoisoned: 10_000},
			AMQP:        AMQP{URL: "amqp://guest:guest@127.0.0.1:5672/", Channels: 4, Prefetch: 16, RedeliverAfter: 2 * time.Minute},
			NATS:        NATS{URL: "nats://127.0.0.1:4222", Prefetch: 16, RedeliverAfter: 2 * time.Minute},
			RedisStream: RedisStream{Addr: "127.0.0.1:6379", RedeliverAfter: 2 * time.Minute},
		},
		Registry: Registry{Kind: RegistryMemory, Redis: Redis{Mode: RedisSingle, Addr: "127.0.0.1:6379", Addrs: []string{}, Prefix: "imcloud:", WaitTimeout: time.Second}},
		Topics: Topics{Push: "imcloud.push", Poison: "imcloud.push.poison", Upstream: "imcloud.upstream", PushMaxLength: 1_000_000, PushShards: 1, PoisonMaxLength: 1_000_000, UpstreamMaxLength: 100_000,
			Events: "imcloud.events", EventsMaxLength: 1_000_000},
		// 10,000 events of ~250 bytes queued: ~2.5 MB, a few seconds of a
		// busy node's deliveries while the broker catches up.
		Events: Events{Enabled: false, Kinds: EventKinds(), Buffer: 10_000},
		Logic: Logic{
			HTTPAddr:        ":3111",
			GRPCAddr:        "127.0.0.1:3119",
			APIKeys:         []string{},
			MaxMessageBytes: 4096 - 16,
			MaxBatchItems:   1000,
			APIStreamWindow: 4096,
			MaxBatchBytes:   4 << 20,
			SessionTTL:      10 * time.Minute,
			IdempotencyTTL:  24 * time.Hour,
			Auth:            Auth{Mode: AuthJWT},
			ReadTimeout:     15 * time.Second,
			WriteTimeout:    30 * time.Second,
			IdleTimeout:     60 * time.Second,
			MaxHeaderBytes:  256 << 10,

			// ~120,000 replies of ~560 bytes (adapters/memory): a day
			// of 1.4 idempotent pushes/s at the default TTL.
			IdempotencyMaxBytes: 64 << 20,
			// A real client reconnects a few times a minute at worst;
			// 20 at once covers a tab-restore of many keys.
			ConnectRate:       2,
			ConnectBurst:      20,
			MaxSessionsPerMid: 64,
			CORSOrigins:       []string{},
		},
		Job: Job{
			Concurrency:     4,
			RoomBatchSize:   20,
			RoomBatchWindow: 0,
			Timeout:         5 * time.Second,
			Retry:           Retry{MaxRetries: 5, InitialInterval: 100 * time.Millisecond, MaxInterval: 5 * time.Second, Multiplier: 2},
			Dedupe:          Dedupe{Enabled: true, TTL: 10 * time.Minute, Store: DedupeMemory},
			CloudAddrs:      []string{},
			Shards:          []int{},
			OfflineGrace:    30 * time.Second,
			CanaryInterval:  5 * time.Second,
		},
		Cloud: Cloud{
			TCPAddr:           ":3101",
			WSAddr:            ":3102",
			WSSAddr:           "",
			GRPCAddr:          "127.0.0.1:3109",
			LogicAddr:         "127.0.0.1:3119",
			AllowedOrigins:    []string{},
			HandshakeTimeout:  5 * time.Second,
			HeartbeatInterval: 4 * time.Minute,
			MaxBodyBytes:      4096,
			SendQueue:         1024,
			Buckets:           32,
			RenewInterval:     10 * time.Second,
			Weight:            1,
			UpstreamRate:      20,
			UpstreamBurst:     40,
			DrainTimeout:      10 * time.Second,
			CanaryTimeout:     15 * time.Second,
			OrderGapWait:      200 * time.Millisecond,
			DedupeTTL:         2 * time.Minute,
			ParkIdle:          true,
			SendQueueBytes:    256 << 10,
			MaxRooms:          16,
			MaxAccepts:        64,
			ClientRate:        50,
			ClientBurst:       100,

			MaxPacedBroadcasts: 4,
			MaxPacedDuration:   10 * time.Minute,
			MaxHandshakesPerIP: 64,
		},
		History: History{
			Enabled: true,
			// A day of a user's messages covers an app that stays
			// closed overnight; 1,000 of 4 KB at most are 4 MB a user.
			User: StreamLimit{Size: 1000, TTL: 24 * time.Hour},
			// Rooms are chatty and shared: enough to bridge a
			// reconnect (a network change, a node drained), not a
			// replay of the day.
			RoomsDefault: StreamLimit{Size: 100, TTL: 5 * time.Minute},
			Rooms:        map[string]StreamLimit{"live": {Size: 100, TTL: 5 * time.Minute}},
			MaxSize:      10_000,
			// pipeline.DefaultHistoryMaxStreams and MaxTotalBytes:
			// ~200 MB of stream state at a million streams, and
			// 512 MiB in all (see there why).
			MaxStreams: 1_000_000,
			MaxBytes:   512 << 20,
		},
	}
}

// Sources are the places a configuration is read from, lowest precedence first
// after the defaults.
type Sources struct {
	// File is a TOML file path; empty reads none.
	File string
	// Environ is the process environment (os.Environ()); only IMCLOUD_
	// variables are read.
	Environ []string
	// Sets are "key=value" overrides from the command line.
	Sets []string
	// Defaults replace built-in defaults for this run (standalone's generated
	// secret and API key) and are themselves overridden by every source.
	Defaults map[string]any
}

// Load merges defaults, file, environment and overrides, then validates.
func Load(src Sources) (Config, error) {
	k := koanf.New(".")
	if err := k.Load(structs.Provider(Default(), "koanf"), nil); err != nil {
		return Config{}, fmt.Errorf("load defaults: %w", err)
	}
	if err := k.Load(confmap.Provider(src.Defaults, "."), nil); err != nil {
		return Config{}, fmt.Errorf("load run defaults: %w", err)
	}
	if src.File != "" {
		if err := k.Load(file.Provider(src.File), toml.Parser()); err != nil {
			return Config{}, fmt.Errorf("read config file %s: %w", src.File, err)
		}
	}
	environ, ignored := configEnviron(src.Environ)
	envProvider := env.Provider(".", env.Opt{
		Prefix:        EnvPrefix,
		EnvironFunc:   func() []string { return environ },
		TransformFunc: envKey,
	})
	if err := k.Load(envProvider, nil); err != nil {
		return Config{}, fmt.Errorf("read environment: %w", err)
	}
	sets := map[string]any{}
	for _, s := range src.Sets {
		key, val, ok := strings.Cut(s, "=")
		if !ok || key == "" {
			return Config{}, fmt.Errorf("--set %q: want key=value", s)
		}
		sets[strings.TrimSpace(key)] = val
	}
	if err := k.Load(confmap.Provider(sets, "."), nil); err != nil {
		return Config{}, fmt.Errorf("apply --set: %w", err)
	}
	var cfg Config
	if err := k.UnmarshalWithConf("", &cfg, koanf.UnmarshalConf{Tag: "koanf", DecoderConfig: decoderConfig(&cfg)}); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	cfg.ignoredEnv = ignored
	return cfg, nil
}

// serviceLink matches, after IMCLOUD_, the variables Kubernetes sets for a
// Service named imcloud: SERVICE_HOST, SERVICE_PORT[_<name>], PORT and
// PORT_<port>_<TCP|UDP|SCTP>[_PROTO|_PORT|_ADDR].
var serviceLink = regexp.MustCompile(`^(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$`)

// configEnviron keeps the IMCLOUD_ variables that are configuration and
// returns apart Kubernetes' service links, which refused start-up as
// unknown keys; any other unknown name is still an error.
func configEnviron(environ []string) (keep, ignored []string) {
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		rest, ok := strings.CutPrefix(name, EnvPrefix)
		if !ok {
			continue
		}
		if serviceLink.MatchString(rest) {
			ignored = append(ignored, name)
			continue
		}
		// Everything else is configuration, a misspelling (IMCLOUD_ADMIN_ADDR
		// for IMCLOUD_ADMIN__ADDR) refused as an unknown key.
		keep = append(keep, kv)
	}
	return keep, ignored
}

// envKey maps IMCLOUD_CLOUD__WS_ADDR to cloud.ws_addr.
func envKey(k, v string) (string, any) {
	k = strings.ToLower(strings.TrimPrefix(k, EnvPrefix))
	return strings.ReplaceAll(k, "__", "."), v
}

func decoderConfig(out any) *mapstructure.DecoderConfig {
	return &mapstructure.DecoderConfig{
		DecodeHook: mapstructure.ComposeDecodeHookFunc(
			durationNeedsUnit,
			mapstructure.StringToTimeDurationHookFunc(),
			trimmedStringToSlice,
		),
		ErrorUnused:      true,
		WeaklyTypedInput: true,
		Metadata:         nil,
		Result:           out,
		TagName:          "koanf",
	}
}

var durationType = reflect.TypeFor[time.Duration]()

// durationNeedsUnit rejects numbers where a duration is expected: a bare 5
// would otherwise silently mean five nanoseconds.
func durationNeedsUnit(from, to reflect.Type, data any) (any, error) {
	if to != durationType || from == durationType {
		return data, nil
	}
	switch from.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64:
		return nil, fmt.Errorf("duration %v has no unit (write e.g. \"%vs\")", data, data)
	case reflect.String:
		if _, err := time.ParseDuration(data.(string)); err != nil {
			return nil, fmt.Errorf("invalid duration %q (write e.g. \"5s\", \"250ms\")", data)
		}
	}
	return data, nil
}

// trimmedStringToSlice splits comma-separated lists from the environment
// and --set; an empty string is an empty list. The file's own form,
// [a, b] with its elements quoted or not, is taken too: written on the
// command line as the README writes it in the file, it was taken as one
// element, brackets and quotes and all (cloud.allowed_origins =
// ["https://a.example"] allowed no origin a browser sends).
func trimmedStringToSlice(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to.Kind() != reflect.Slice {
		return data, nil
	}
	s := strings.TrimSpace(data.(string))
	bracketed := false
	if inner, ok := strings.CutPrefix(s, "["); ok {
		if inner, ok = strings.CutSuffix(inner, "]"); ok {
			s, bracketed = strings.TrimSpace(inner), true
		}
	}
	if s == "" {
		return []string{}, nil
	}
	parts := strings.Split(s, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
		if bracketed && len(parts[i]) >= 2 && (parts[i][0] == '"' || parts[i][0] == '\'') && parts[i][len(parts[i])-1] == parts[i][0] {
			parts[i] = parts[i][1 : len(parts[i])-1]
		}
	}
	return parts, nil
}

// Has reports whether the configuration runs stage.
func (c Config) Has(stage string) bool { return slices.Contains(c.Stages, stage) }

// Validate checks every value; the error names each offending key.
func (c Config) Validate() error {
	var errs []error
	bad := func(key string, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	oneOf := func(key, v string, allowed ...string) {
		if !slices.Contains(allowed, v) {
			bad(key, "%q is not one of %s", v, strings.Join(allowed, ", "))
		}
	}
	positive := func(key string, v int) {
		if v <= 0 {
			bad(key, "must be greater than 0, got %d", v)
		}
	}
	positiveDur := func(key string, v time.Duration) {
		if v <= 0 {
			bad(key, "must be greater than 0, got %s", v)
		}
	}
	addr := func(key, v string, required bool) {
		if v == "" {
			if required {
				bad(key, "an address is required")
			}
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			bad(key, "%q is not host:port", v)
		}
	}

	if len(c.Stages) == 0 {
		bad("stages", "at least one of logic, job, cloud is required")
	}
	for _, s := range c.Stages {
		oneOf("stages", s, StageLogic, StageJob, StageCloud)
	}
	oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	oneOf("log.format", c.Log.Format, "text", "json")
	addr("admin.addr", c.Admin.Addr, false)
	oneOf("broker.kind", c.Broker.Kind, BrokerAMQP, BrokerGoChannel, BrokerNATS, BrokerRedisStream)
	positive("broker.amqp.channels", c.Broker.AMQP.Channels)
	positive("broker.amqp.prefetch", c.Broker.AMQP.Prefetch)
	positive("broker.nats.prefetch", c.Broker.NATS.Prefetch)
	positiveDur("broker.amqp.redeliver_after", c.Broker.AMQP.RedeliverAfter)
	positiveDur("broker.nats.redeliver_after", c.Broker.NATS.RedeliverAfter)
	positiveDur("broker.redisstream.redeliver_after", c.Broker.RedisStream.RedeliverAfter)
	oneOf("registry.kind", c.Registry.Kind, RegistryMemory, RegistryRedis)
	for key, v := range map[string]string{"topics.push": c.Topics.Push, "topics.poison": c.Topics.Poison, "topics.upstream": c.Topics.Upstream} {
		if v == "" {
			bad(key, "a topic name is required")
		}
	}
	if c.Topics.PushShards < 1 || c.Topics.PushShards > MaxPushShards {
		bad("topics.push_shards", "must be 1 to %d, got %d", MaxPushShards, c.Topics.PushShards)
	} else {
		// A shard named like another topic would mix the two queues.
		others := map[string]string{c.Topics.Poison: "topics.poison", c.Topics.Upstream: "topics.upstream"}
		if c.Events.Enabled {
			others[c.Topics.Events] = "topics.events"
		}
		for _, t := range c.Topics.PushTopics() {
			if key, ok := others[t]; ok {
				bad("topics.push", "its shard %q is also %s", t, key)
			}
		}
		seen := map[int]bool{}
		for _, i := range c.Job.Shards {
			if i < 0 || i >= c.Topics.PushShards {
				bad("job.shards", "shard %d is not one of 0 … %d (topics.push_shards = %d)", i, c.Topics.PushShards-1, c.Topics.PushShards)
			} else if seen[i] {
				bad("job.shards", "shard %d is listed twice", i)
			}
			seen[i] = true
		}
		// The embedded broker drops what no subscriber of this process
		// reads: a shard left out would lose its pushes.
		if c.Broker.Kind == BrokerGoChannel && len(c.Job.Shards) > 0 && len(seen) < c.Topics.PushShards {
			bad("job.shards", "broker.kind %q has one job, which must consume every shard: leave job.shards empty", BrokerGoChannel)
		}
	}

	addr("logic.http_addr", c.Logic.HTTPAddr, c.Has(StageLogic))
	addr("logic.grpc_addr", c.Logic.GRPCAddr, c.Has(StageLogic))
	positive("logic.max_message_bytes", c.Logic.MaxMessageBytes)
	positive("logic.max_batch_items", c.Logic.MaxBatchItems)
	positive("logic.max_batch_bytes", c.Logic.MaxBatchBytes)
	positive("logic.api_stream_window", c.Logic.APIStreamWindow)
	positiveDur("logic.session_ttl", c.Logic.SessionTTL)
	positiveDur("logic.idempotency_ttl", c.Logic.IdempotencyTTL)
	positive("logic.idempotency_max_bytes", c.Logic.IdempotencyMaxBytes)
	positiveDur("logic.read_timeout", c.Logic.ReadTimeout)
	positiveDur("logic.write_timeout", c.Logic.WriteTimeout)
	positiveDur("logic.idle_timeout", c.Logic.IdleTimeout)
	positive("logic.max_header_bytes", c.Logic.MaxHeaderBytes)
	if c.Logic.ConnectRate < 0 {
		bad("logic.connect_rate", "must not be negative (0 = no limit)")
	}
	if c.Logic.ConnectRate > 0 && c.Logic.ConnectBurst < 1 {
		bad("logic.connect_burst", "must be at least 1 when logic.connect_rate is set, got %d", c.Logic.ConnectBurst)
	}
	if c.Logic.MaxSessionsPerMid < 0 {
		bad("logic.max_sessions_per_mid", "must not be negative (0 = no limit)")
	}
	oneOf("logic.auth.mode", c.Logic.Auth.Mode, AuthJWT, AuthInsecureJSON)
	if c.Has(StageLogic) && c.Logic.Auth.Mode == AuthJWT && c.Logic.Auth.JWTSecret == "" && c.Logic.Auth.JWTPublicKeyFile == "" {
		bad("logic.auth.jwt_secret", "jwt mode needs jwt_secret or jwt_public_key_file")
	}

	positive("broker.gochannel.max_pending", c.Broker.GoChannel.MaxPending)
	positive("broker.gochannel.max_poisoned", c.Broker.GoChannel.MaxPoisoned)
	positive("job.concurrency", c.Job.Concurrency)
	positive("job.room_batch_size", c.Job.RoomBatchSize)
	if c.Job.RoomBatchWindow < 0 {
		bad("job.room_batch_window", "must not be negative")
	}
	positiveDur("job.timeout", c.Job.Timeout)
	if c.Job.CanaryInterval < 0 || (c.Job.CanaryInterval > 0 && c.Job.CanaryInterval < 100*time.Millisecond) {
		bad("job.canary_interval", "must be 0 (off) or at least 100ms, got %s", c.Job.CanaryInterval)
	}
	if c.Job.Retry.MaxRetries < 0 {
		bad("job.retry.max_retries", "must not be negative")
	}
	positiveDur("job.retry.initial_interval", c.Job.Retry.InitialInterval)
	positiveDur("job.retry.max_interval", c.Job.Retry.MaxInterval)
	if c.Job.Retry.Multiplier < 1 {
		bad("job.retry.multiplier", "must be at least 1, got %v", c.Job.Retry.Multiplier)
	}
	positiveDur("job.dedupe.ttl", c.Job.Dedupe.TTL)
	oneOf("job.dedupe.store", c.Job.Dedupe.Store, DedupeMemory, DedupeRedis)
	// Watermill's throttle ticks every second/throttle: past a million a
	// second the tick is below a microsecond (at 1e9+ it is 0 and the
	// router panics), a cap nothing can use.
	if c.Job.Throttle < 0 || c.Job.Throttle > maxThrottle {
		bad("job.throttle", "must be between 0 (no cap) and %d messages per second, got %d", maxThrottle, c.Job.Throttle)
	}
	// Its upper bound is the broker's redelivery window and the dedupe
	// windows: checkWorstCase below.
	if c.Job.OfflineGrace < 0 {
		bad("job.offline_grace", "must not be negative, got %s", c.Job.OfflineGrace)
	}
	if c.Events.Enabled && c.Topics.Events == "" {
		bad("topics.events", "a topic name is required when events.enabled")
	}
	for _, k := range c.Events.Kinds {
		oneOf("events.kinds", k, EventKinds()...)
	}
	positive("events.buffer", c.Events.Buffer)
	for key, v := range map[string]int64{"topics.push_max_length": c.Topics.PushMaxLength, "topics.poison_max_length": c.Topics.PoisonMaxLength, "topics.upstream_max_length": c.Topics.UpstreamMaxLength, "topics.events_max_length": c.Topics.EventsMaxLength} {
		if v < 1 {
			bad(key, "must be at least 1, got %d", v)
		}
	}
	for _, a := range c.Job.CloudAddrs {
		addr("job.cloud_addrs", a, true)
	}

	needCloud := c.Has(StageCloud)
	addr("cloud.tcp_addr", c.Cloud.TCPAddr, false)
	addr("cloud.ws_addr", c.Cloud.WSAddr, false)
	addr("cloud.wss_addr", c.Cloud.WSSAddr, false)
	addr("cloud.grpc_addr", c.Cloud.GRPCAddr, needCloud)
	addr("cloud.advertise_addr", c.Cloud.AdvertiseAddr, false)
	addr("cloud.logic_addr", c.Cloud.LogicAddr, needCloud)
	if needCloud && c.Cloud.TCPAddr == "" && c.Cloud.WSAddr == "" && c.Cloud.WSSAddr == "" {
		bad("cloud.ws_addr", "cloud needs at least one of tcp_addr, ws_addr, wss_addr")
	}
	if c.Cloud.WSSAddr != "" && (c.Cloud.TLSCertFile == "" || c.Cloud.TLSKeyFile == "") {
		bad("cloud.tls_cert_file", "wss_addr needs tls_cert_file and tls_key_file")
	}
	positiveDur("cloud.handshake_timeout", c.Cloud.HandshakeTimeout)
	positiveDur("cloud.heartbeat_interval", c.Cloud.HeartbeatInterval)
	positiveDur("cloud.renew_interval", c.Cloud.RenewInterval)
	positive("cloud.weight", c.Cloud.Weight)
	positive("cloud.max_body_bytes", c.Cloud.MaxBodyBytes)
	positive("cloud.send_queue", c.Cloud.SendQueue)
	positive("cloud.buckets", c.Cloud.Buckets)
	if c.Cloud.UpstreamRate < 0 {
		bad("cloud.upstream_rate", "must not be negative")
	}
	positive("cloud.upstream_burst", c.Cloud.UpstreamBurst)
	if c.Cloud.Sndbuf < 0 {
		bad("cloud.sndbuf", "must not be negative")
	}
	if c.Cloud.Rcvbuf < 0 {
		bad("cloud.rcvbuf", "must not be negative")
	}
	positiveDur("cloud.drain_timeout", c.Cloud.DrainTimeout)
	positiveDur("cloud.order_gap_wait", c.Cloud.OrderGapWait)
	positiveDur("cloud.dedupe_ttl", c.Cloud.DedupeTTL)
	if c.Cloud.SendQueueBytes < c.Cloud.MaxBodyBytes+16 {
		bad("cloud.send_queue_bytes", "must hold at least one packet (max_body_bytes + 16 = %d), got %d", c.Cloud.MaxBodyBytes+16, c.Cloud.SendQueueBytes)
	}
	positive("cloud.max_rooms", c.Cloud.MaxRooms)
	positive("cloud.max_accepts", c.Cloud.MaxAccepts)
	if c.Cloud.ClientRate <= 0 {
		bad("cloud.client_rate", "must be greater than 0, got %v", c.Cloud.ClientRate)
	}
	positive("cloud.client_burst", c.Cloud.ClientBurst)
	positive("cloud.max_paced_broadcasts", c.Cloud.MaxPacedBroadcasts)
	positiveDur("cloud.max_paced_duration", c.Cloud.MaxPacedDuration)
	if c.Cloud.MaxConns < 0 {
		bad("cloud.max_conns", "must not be negative (0 derives it from the descriptor limit)")
	}
	positive("cloud.max_handshakes_per_ip", c.Cloud.MaxHandshakesPerIP)

	for _, o := range c.Logic.CORSOrigins {
		if err := validOrigin(o); err != nil {
			bad("logic.cors_origins", "%v", err)
		}
	}
	for i, k := range c.Logic.APIKeys {
		if len(k) < MinAPIKey {
			// The key itself is a secret: name its position, not its value.
			bad("logic.api_keys", "key %d is %d characters, want at least %d (e.g. openssl rand -hex 16)", i+1, len(k), MinAPIKey)
		}
	}
	cl := c.Cluster
	if n := len(cl.Secret); n > 0 && n < MinClusterSecret {
		bad("cluster.secret", "is %d characters, want at least %d (e.g. openssl rand -hex 32)", n, MinClusterSecret)
	}
	if tlsSet := []bool{cl.TLSCertFile != "", cl.TLSKeyFile != "", cl.TLSCAFile != ""}; slices.Contains(tlsSet, true) && slices.Contains(tlsSet, false) {
		bad("cluster.tls_cert_file", "mutual TLS needs all of cluster.tls_cert_file, cluster.tls_key_file and cluster.tls_ca_file")
	}
	errs = append(errs, c.History.validate()...)
	errs = append(errs, c.Registry.Redis.validate()...)
	errs = append(errs, c.CheckWorstCase(), c.CheckBinds())
	return errors.Join(errs...)
}

// validate checks [history]; each error names its key.
func (h History) validate() []error {
	var errs []error
	if h.MaxSize < 1 || h.MaxSize > maxHistorySize {
		errs = append(errs, fmt.Errorf("history.max_size: must be from 1 to %d messages, got %d", maxHistorySize, h.MaxSize))
	}
	if h.MaxStreams < minHistoryStreams || h.MaxStreams > maxHistoryStreams {
		errs = append(errs, fmt.Errorf("history.max_streams: must be from %d to %d streams, got %d", minHistoryStreams, maxHistoryStreams, h.MaxStreams))
	}
	if h.MaxBytes < minHistoryBytes {
		errs = append(errs, fmt.Errorf("history.max_bytes: must be at least %d (8 MiB), got %d", minHistoryBytes, h.MaxBytes))
	}
	check := func(key string, l StreamLimit) {
		if l.Size < 0 {
			errs = append(errs, fmt.Errorf("%s.size: must not be negative (0 keeps positions only), got %d", key, l.Size))
		}
		if h.MaxSize >= 1 && l.Size > h.MaxSize {
			errs = append(errs, fmt.Errorf("%s.size: %d is over history.max_size (%d)", key, l.Size, h.MaxSize))
		}
		// A stream's positions and epoch live as long as its TTL
		// after its last message: 0 would forget them at once.
		if l.TTL <= 0 {
			errs = append(errs, fmt.Errorf("%s.ttl: must be greater than 0, got %s", key, l.TTL))
		}
	}
	check("history.user", h.User)
	check("history.rooms_default", h.RoomsDefault)
	// A cursor with nothing kept behind it would redeliver nothing.
	if h.User.Acks && h.User.Size == 0 {
		errs = append(errs, errors.New("history.user.acks: needs history.user.size > 0 (acks redeliver unacknowledged messages from history; size 0 keeps none)"))
	}
	// A room's stream is shared by everyone in it: one person's ack
	// cannot say what the others received.
	roomAcks := func(key string, l StreamLimit) {
		if l.Acks {
			errs = append(errs, fmt.Errorf("%s.acks: acks are kept for user streams only (history.user.acks); a room stream is shared and has no cursor per person", key))
		}
	}
	roomAcks("history.rooms_default", h.RoomsDefault)
	for _, typ := range slices.Sorted(maps.Keys(h.Rooms)) {
		if !validRoomType(typ) {
			errs = append(errs, fmt.Errorf("history.rooms: %q is not a room type (1 to %d letters, digits, '_' or '-'; the part of type://id before \"://\")", truncateKey(typ), maxRoomType))
			continue
		}
		check("history.rooms."+typ, h.Rooms[typ])
		roomAcks("history.rooms."+typ, h.Rooms[typ])
	}
	return errs
}

// truncateKey shortens a configured key quoted in an error.
func truncateKey(s string) string {
	if len(s) > maxRoomType {
		return s[:maxRoomType] + "…"
	}
	return s
}

// IsLoopback reports whether a listen address stays on this machine: its
// host is a loopback IP or "localhost". An empty host (":3111") listens on
// every interface.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Exposures are warnings about what the configuration exposes on purpose:
// an open push API, the cluster secret in clear, the admin listener beyond
// loopback. Start-up logs them and imcloud check prints them.
func (c Config) Exposures() []string {
	var out []string
	if len(c.ignoredEnv) > 0 {
		out = append(out, fmt.Sprintf("environment variables %s ignored: Kubernetes service links, not configuration (IMCLOUD_<SECTION>__<KEY>)",
			strings.Join(c.ignoredEnv, ", ")))
	}
	if c.Has(StageLogic) && len(c.Logic.APIKeys) == 0 && c.Logic.HTTPAddr != "" && !IsLoopback(c.Logic.HTTPAddr) {
		out = append(out, fmt.Sprintf("logic.http_addr %q: the push API has no API keys and listens beyond loopback (logic.allow_anonymous = true): anyone who reaches it can push to every client", c.Logic.HTTPAddr))
	}
	if c.Cluster.Secret != "" && !c.Cluster.MTLS() {
		if clear := c.clearSecretKeys(); len(clear) > 0 {
			out = append(out, fmt.Sprintf("internal gRPC beyond loopback without mutual TLS (%s): cluster.secret travels in clear; "+
				"set cluster.tls_cert_file, tls_key_file and tls_ca_file where others can read the network", strings.Join(clear, ", ")))
		}
	}
	if c.Has(StageLogic) && c.Logic.Auth.Mode == AuthInsecureJSON {
		out = append(out, "logic.auth.mode = \"insecure-json\": clients are trusted as they claim (any mid, any room, any operation); use jwt outside a trusted network")
	}
	if c.Has(StageLogic) && c.Logic.Auth.Mode == AuthJWT && c.Logic.Auth.JWTPublicKeyFile == "" && c.Logic.Auth.JWTSecret != "" && len(c.Logic.Auth.JWTSecret) < MinJWTSecret {
		out = append(out, fmt.Sprintf("logic.auth.jwt_secret is %d characters: an HS256 secret that short can be guessed offline from one token; use at least %d random ones (e.g. openssl rand -hex 32)", len(c.Logic.Auth.JWTSecret), MinJWTSecret))
	}
	if c.Has(StageCloud) && slices.Contains(c.Cloud.AllowedOrigins, "*") {
		out = append(out, "cloud.allowed_origins contains \"*\": any web page may open WebSocket connections with its visitors' tokens; list your sites instead")
	}
	if c.Has(StageLogic) && slices.Contains(c.Logic.CORSOrigins, "*") {
		out = append(out, "logic.cors_origins contains \"*\": any web page may call the push API with a key it holds; list your sites instead")
	}
	if c.Admin.Addr != "" && !IsLoopback(c.Admin.Addr) {
		out = append(out, fmt.Sprintf("admin.addr %q: profiles and goroutine dumps are served beyond loopback; bind it to 127.0.0.1 or firewall it", c.Admin.Addr))
	}
	return out
}

// clearSecretKeys are the keys whose addresses carry the cluster secret
// beyond this machine: the gRPC servers that receive it and the peers this
// node sends it to (logic, the cloud nodes job dials, and the address
// this cloud tells job and logic to dial).
func (c Config) clearSecretKeys() []string {
	var keys []string
	if c.Has(StageLogic) && !IsLoopback(c.Logic.GRPCAddr) {
		keys = append(keys, "logic.grpc_addr")
	}
	if c.Has(StageCloud) && !IsLoopback(c.Cloud.GRPCAddr) {
		keys = append(keys, "cloud.grpc_addr")
	}
	// With logic in the same process, cloud dials the address logic is
	// bound to, not cloud.logic_addr.
	if c.Has(StageCloud) && !c.Has(StageLogic) && !dialsLoopback(c.Cloud.LogicAddr) {
		keys = append(keys, "cloud.logic_addr")
	}
	if c.Has(StageCloud) && c.Cloud.AdvertiseAddr != "" && !dialsLoopback(c.Cloud.AdvertiseAddr) {
		keys = append(keys, "cloud.advertise_addr")
	}
	if c.Has(StageJob) && slices.ContainsFunc(c.Job.CloudAddrs, func(a string) bool { return !dialsLoopback(a) }) {
		keys = append(keys, "job.cloud_addrs")
	}
	return keys
}

// dialsLoopback reports whether dialling addr stays on this machine; unlike
// a listen address, an empty host dials the local system.
func dialsLoopback(addr string) bool {
	if host, _, err := net.SplitHostPort(addr); err == nil && host == "" {
		return true
	}
	return IsLoopback(addr)
}

// CheckBinds refuses listeners that would serve an unauthenticated service
// beyond this machine: logic's or cloud's gRPC without the cluster secret
// or mutual TLS, and the push API without API keys unless
// logic.allow_anonymous says so. Each error names the key and the fix.
func (c Config) CheckBinds() error {
	var errs []error
	if !c.Cluster.Authenticated() {
		for _, l := range []struct {
			stage, key, addr string
		}{{StageLogic, "logic.grpc_addr", c.Logic.GRPCAddr}, {StageCloud, "cloud.grpc_addr", c.Cloud.GRPCAddr}} {
			if c.Has(l.stage) && l.addr != "" && !IsLoopback(l.addr) {
				errs = append(errs, fmt.Errorf("%s: %q listens beyond loopback and internal gRPC is unauthenticated: "+
					"set cluster.secret to the same random value on every node (e.g. IMCLOUD_CLUSTER__SECRET=$(openssl rand -hex 32)), "+
					"or mutual TLS with cluster.tls_cert_file, cluster.tls_key_file and cluster.tls_ca_file, or bind it to 127.0.0.1", l.key, l.addr))
			}
		}
	}
	for _, l := range []struct{ key, addr string }{{"logic.http_addr", c.Logic.HTTPAddr}, {"logic.api_grpc_addr", c.Logic.APIGRPCAddr}} {
		if c.Has(StageLogic) && l.addr != "" && !IsLoopback(l.addr) && len(c.Logic.APIKeys) == 0 && !c.Logic.AllowAnonymous {
			errs = append(errs, fmt.Errorf("%s: %q serves the push API beyond loopback with no logic.api_keys: "+
				"set logic.api_keys (e.g. IMCLOUD_LOGIC__API_KEYS=$(openssl rand -hex 16)), bind it to 127.0.0.1, "+
				"or set logic.allow_anonymous = true to let anyone who reaches it push", l.key, l.addr))
		}
	}
	return errors.Join(errs...)
}

// validOrigin checks a web origin as a browser sends it: "*", or
// scheme://host[:port] with scheme http or https and nothing after.
func validOrigin(o string) error {
	if o == "*" {
		return nil
	}
	u, err := url.Parse(o)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("%q is not an origin: want \"*\" or scheme://host[:port], e.g. https://app.example.com", o)
	}
	return nil
}

// Reloadable are the keys a running process takes from a reloaded
// configuration (SIGHUP): the log level, and logic's API keys, client-token
// keys and browser origins, so that each can be rotated without a restart.
var Reloadable = []string{"log.level", "logic.api_keys", "logic.auth.jwt_secret", "logic.auth.jwt_public_key_file", "logic.cors_origins"}

// Diff lists the keys whose values differ between a and b, sorted: what a
// reload changes. Values are not returned: some are secrets.
func Diff(a, b Config) ([]string, error) {
	flat := func(c Config) (map[string]any, error) {
		k := koanf.New(".")
		if err := k.Load(structs.Provider(c, "koanf"), nil); err != nil {
			return nil, fmt.Errorf("flatten configuration: %w", err)
		}
		return k.All(), nil
	}
	fa, err := flat(a)
	if err != nil {
		return nil, err
	}
	fb, err := flat(b)
	if err != nil {
		return nil, err
	}
	var out []string
	for key, va := range fa {
		if vb, ok := fb[key]; !ok || fmt.Sprint(va) != fmt.Sprint(vb) {
			out = append(out, key)
		}
	}
	for key := range fb {
		if _, ok := fa[key]; !ok {
			out = append(out, key)
		}
	}
	slices.Sort(out)
	return out, nil
}
