package config

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// withSecret makes the defaults valid for a logic stage in jwt mode whose
// push API listens on every interface.
var withSecret = map[string]any{"logic.auth.jwt_secret": "s", "logic.api_keys": "0123456789abcdef-key"}

func TestExampleFileIsTheDefaults(t *testing.T) {
	got, err := Load(Sources{File: "../../config.example.toml"})
	if err != nil {
		// The example leaves the secret and the API keys empty like the
		// defaults; they are all it needs to be valid.
		if !strings.Contains(err.Error(), "logic.auth.jwt_secret") || !strings.Contains(err.Error(), "logic.api_keys") {
			t.Fatalf("Load example: %v", err)
		}
		got, err = Load(Sources{File: "../../config.example.toml", Sets: []string{"logic.auth.jwt_secret=s", "logic.api_keys=0123456789abcdef-key"}})
		if err != nil {
			t.Fatalf("Load example: %v", err)
		}
	}
	want := Default()
	want.Logic.Auth.JWTSecret = "s"
	want.Logic.APIKeys = []string{"0123456789abcdef-key"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("config.example.toml differs from Default():\n got %+v\nwant %+v", got, want)
	}
}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "c.toml")
	writeFile(t, f, "[cloud]\nws_addr = \":1\"\ntcp_addr = \":2\"\nsend_queue = 10\n[logic.auth]\njwt_secret = \"file\"\n")
	cfg, err := Load(Sources{
		File:    f,
		Environ: []string{"IMCLOUD_CLOUD__TCP_ADDR=:3", "IMCLOUD_CLOUD__SEND_QUEUE=20", "IMCLOUD_CLOUD__ALLOWED_ORIGINS=a.com, b.com", "PATH=/bin"},
		Sets:    []string{"cloud.send_queue=30", "job.timeout=2s", "logic.api_keys=0123456789abcdef-key"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Cloud.WSAddr != ":1" {
		t.Errorf("ws_addr = %q, want the file's :1", cfg.Cloud.WSAddr)
	}
	if cfg.Cloud.TCPAddr != ":3" {
		t.Errorf("tcp_addr = %q, want the environment's :3", cfg.Cloud.TCPAddr)
	}
	if cfg.Cloud.SendQueue != 30 {
		t.Errorf("send_queue = %d, want --set's 30", cfg.Cloud.SendQueue)
	}
	if cfg.Job.Timeout != 2*time.Second {
		t.Errorf("job.timeout = %s, want 2s", cfg.Job.Timeout)
	}
	if want := []string{"a.com", "b.com"}; !reflect.DeepEqual(cfg.Cloud.AllowedOrigins, want) {
		t.Errorf("allowed_origins = %q, want %q", cfg.Cloud.AllowedOrigins, want)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		environ []string
		sets    []string
		wantKey string
	}{
		{name: "unknown file key", file: "[cloud]\nws_adr = \":1\"\n", wantKey: "ws_adr"},
		{name: "unknown section", file: "[clod]\nx = 1\n", wantKey: "clod"},
		{name: "unknown env variable", environ: []string{"IMCLOUD_CLOUD__NOPE=1"}, wantKey: "nope"},
		{name: "unknown set key", sets: []string{"logic.nope=1"}, wantKey: "nope"},
		{name: "duration without unit in file", file: "[cloud]\nhandshake_timeout = 5\n", wantKey: "handshake_timeout"},
		{name: "duration without unit in env", environ: []string{"IMCLOUD_JOB__TIMEOUT=5"}, wantKey: "timeout"},
		{name: "not a number", sets: []string{"cloud.send_queue=lots"}, wantKey: "send_queue"},
		{name: "bad enum", sets: []string{"broker.kind=kafka"}, wantKey: "broker.kind"},
		{name: "bad stage", sets: []string{"stages=logic,comet"}, wantKey: "stages"},
		{name: "zero buckets", sets: []string{"cloud.buckets=0"}, wantKey: "cloud.buckets"},
		{name: "bad address", sets: []string{"cloud.ws_addr=nohost"}, wantKey: "cloud.ws_addr"},
		{name: "jwt without secret", sets: []string{"logic.auth.jwt_secret="}, wantKey: "logic.auth.jwt_secret"},
		{name: "malformed set", sets: []string{"novalue"}, wantKey: "novalue"},
		{name: "short cluster secret", sets: []string{"cluster.secret=short"}, wantKey: "cluster.secret"},
		{name: "empty API key", file: "[logic]\napi_keys = [\"\"]\n", wantKey: "logic.api_keys"},
		{name: "empty API key among good ones", file: "[logic]\napi_keys = [\"0123456789abcdef\", \"\"]\n", wantKey: "logic.api_keys"},
		{name: "short API key", sets: []string{"logic.api_keys=0123456789abcde"}, wantKey: "logic.api_keys"},
		{name: "half of mutual TLS", sets: []string{"cluster.tls_cert_file=c.pem"}, wantKey: "cluster.tls_cert_file"},
		{name: "offline grace past redelivery", sets: []string{"job.offline_grace=5m"}, wantKey: "job.offline_grace"},
		{name: "negative offline grace", sets: []string{"job.offline_grace=-1s"}, wantKey: "job.offline_grace"},
		{name: "unbounded upstream", sets: []string{"topics.upstream_max_length=0"}, wantKey: "topics.upstream_max_length"},
		{name: "no gochannel room", sets: []string{"broker.gochannel.max_pending=0"}, wantKey: "broker.gochannel.max_pending"},
		{name: "no room for poisoned messages", sets: []string{"broker.gochannel.max_poisoned=0"}, wantKey: "broker.gochannel.max_poisoned"},
		{name: "negative connect rate", sets: []string{"logic.connect_rate=-1"}, wantKey: "logic.connect_rate"},
		{name: "connect rate without burst", sets: []string{"logic.connect_burst=0"}, wantKey: "logic.connect_burst"},
		{name: "unknown event kind", sets: []string{"events.kinds=connect,read"}, wantKey: "events.kinds"},
		{name: "CORS origin without a scheme", sets: []string{"logic.cors_origins=demo.test"}, wantKey: "logic.cors_origins"},
		{name: "CORS origin with a path", sets: []string{"logic.cors_origins=https://demo.test/app"}, wantKey: "logic.cors_origins"},
		{name: "CORS origin of another scheme", sets: []string{"logic.cors_origins=ftp://demo.test"}, wantKey: "logic.cors_origins"},
		{name: "events without a topic", sets: []string{"events.enabled=true", "topics.events="}, wantKey: "topics.events"},
		{name: "no event buffer", sets: []string{"events.buffer=0"}, wantKey: "events.buffer"},
		{name: "unbounded events", sets: []string{"topics.events_max_length=0"}, wantKey: "topics.events_max_length"},
		{name: "negative session cap", sets: []string{"logic.max_sessions_per_mid=-1"}, wantKey: "logic.max_sessions_per_mid"},
		{name: "negative user history", sets: []string{"history.user.size=-1"}, wantKey: "history.user.size"},
		{name: "user history without ttl", sets: []string{"history.user.ttl=0s"}, wantKey: "history.user.ttl"},
		{name: "room history over the cap", sets: []string{"history.rooms_default.size=20000"}, wantKey: "history.rooms_default.size"},
		{name: "room type over the cap", file: "[history.rooms]\nchat = {size = 10001, ttl = \"1m\"}\n", wantKey: "history.rooms.chat.size"},
		{name: "room type without ttl", environ: []string{"IMCLOUD_HISTORY__ROOMS__CHAT__SIZE=5"}, wantKey: "history.rooms.chat.ttl"},
		{name: "room type ttl without unit", file: "[history.rooms]\nchat = {size = 1, ttl = 60}\n", wantKey: "ttl"},
		{name: "room type with a scheme", file: "[history.rooms]\n\"chat://\" = {size = 1, ttl = \"1m\"}\n", wantKey: "history.rooms"},
		{name: "unknown room limit field", file: "[history.rooms]\nchat = {size = 1, ttl = \"1m\", bytes = 5}\n", wantKey: "bytes"},
		{name: "no history cap", sets: []string{"history.max_size=0"}, wantKey: "history.max_size"},
		{name: "acks on the default room class", sets: []string{"history.rooms_default.acks=true"}, wantKey: "history.rooms_default.acks"},
		{name: "acks on a room type", file: "[history.rooms]\nchat = {size = 10, ttl = \"1m\", acks = true}\n", wantKey: "history.rooms.chat.acks"},
		{name: "user acks with nothing kept", file: "[history]\nuser = {size = 0, ttl = \"1h\", acks = true}\n", wantKey: "history.user.acks"},
		{name: "acks not a bool", sets: []string{"history.user.acks=maybe"}, wantKey: "acks"},
		{name: "huge history cap", sets: []string{"history.max_size=1000000"}, wantKey: "history.max_size"},
		{name: "too few history streams", sets: []string{"history.max_streams=10"}, wantKey: "history.max_streams"},
		{name: "no history stream cap", sets: []string{"history.max_streams=0"}, wantKey: "history.max_streams"},
		{name: "huge history stream cap", sets: []string{"history.max_streams=1000000000"}, wantKey: "history.max_streams"},
		{name: "tiny history byte cap", sets: []string{"history.max_bytes=1024"}, wantKey: "history.max_bytes"},
		{name: "history byte cap not a number", sets: []string{"history.max_bytes=lots"}, wantKey: "max_bytes"},
		{name: "no push shards", sets: []string{"topics.push_shards=0"}, wantKey: "topics.push_shards"},
		{name: "too many push shards", sets: []string{"topics.push_shards=1025"}, wantKey: "topics.push_shards"},
		{name: "push shards not a number", sets: []string{"topics.push_shards=four"}, wantKey: "push_shards"},
		{name: "a push shard named like the upstream topic", sets: []string{"topics.push_shards=2", "topics.push=q", "topics.upstream=q.1"}, wantKey: "topics.push"},
		{name: "a job shard past the shards", sets: []string{"topics.push_shards=4", "job.shards=1,4"}, wantKey: "job.shards"},
		{name: "a negative job shard", sets: []string{"topics.push_shards=4", "job.shards=-1"}, wantKey: "job.shards"},
		{name: "a job shard twice", sets: []string{"topics.push_shards=4", "job.shards=2,2"}, wantKey: "job.shards"},
		{name: "a job shard without shards", sets: []string{"job.shards=1"}, wantKey: "job.shards"},
		{name: "some shards on the embedded broker", sets: []string{"broker.kind=gochannel", "topics.push_shards=4", "job.shards=1,3"}, wantKey: "job.shards"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := Sources{Environ: tt.environ, Sets: tt.sets, Defaults: withSecret}
			if tt.file != "" {
				src.File = filepath.Join(t.TempDir(), "c.toml")
				writeFile(t, src.File, tt.file)
			}
			_, err := Load(src)
			if err == nil {
				t.Fatal("Load succeeded, want an error")
			}
			if !strings.Contains(err.Error(), tt.wantKey) {
				t.Fatalf("error %q does not name %q", err, tt.wantKey)
			}
		})
	}
}

// TestBindRules: start-up refuses a listener beyond loopback that would
// serve an unauthenticated service, and names the key and the fix.
func TestBindRules(t *testing.T) {
	const secret = "cluster.secret=0123456789abcdef"
	mtls := []string{"cluster.tls_cert_file=c.pem", "cluster.tls_key_file=k.pem", "cluster.tls_ca_file=ca.pem"}
	tests := []struct {
		name string
		sets []string
		want []string // keys the error names; none = accepted
	}{
		{"defaults with API keys", []string{"logic.api_keys=0123456789abcdef-key"}, nil},
		{"defaults without API keys", nil, []string{"logic.http_addr", "logic.api_keys", "logic.allow_anonymous"}},
		{"loopback push API without keys", []string{"logic.http_addr=127.0.0.1:3111"}, nil},
		{"localhost push API without keys", []string{"logic.http_addr=localhost:3111"}, nil},
		{"IPv6 loopback push API without keys", []string{"logic.http_addr=[::1]:3111"}, nil},
		{"open push API allowed on purpose", []string{"logic.allow_anonymous=true"}, nil},
		{"push API on an interface without keys", []string{"logic.http_addr=10.0.0.5:3111"}, []string{"logic.http_addr"}},
		{"push API check skipped without logic", []string{"stages=cloud"}, nil},
		{"gRPC push API on an interface without keys", []string{"logic.http_addr=127.0.0.1:3111", "logic.api_grpc_addr=:3113"}, []string{"logic.api_grpc_addr", "logic.api_keys"}},
		{"gRPC push API on loopback without keys", []string{"logic.http_addr=127.0.0.1:3111", "logic.api_grpc_addr=127.0.0.1:3113"}, nil},
		{"gRPC push API with keys", []string{"logic.api_keys=0123456789abcdef-key", "logic.api_grpc_addr=:3113"}, nil},
		{"logic grpc on every interface", []string{"logic.api_keys=0123456789abcdef-key", "logic.grpc_addr=:3119"}, []string{"logic.grpc_addr", "cluster.secret", "cluster.tls_cert_file"}},
		{"logic grpc on 0.0.0.0", []string{"logic.api_keys=0123456789abcdef-key", "logic.grpc_addr=0.0.0.0:3119"}, []string{"logic.grpc_addr"}},
		{"cloud grpc on every interface", []string{"logic.api_keys=0123456789abcdef-key", "cloud.grpc_addr=:3109"}, []string{"cloud.grpc_addr", "cluster.secret"}},
		{"cloud grpc on a host name", []string{"stages=cloud", "cloud.grpc_addr=node1.internal:3109"}, []string{"cloud.grpc_addr"}},
		{"both grpc with the secret", []string{"logic.api_keys=0123456789abcdef-key", "logic.grpc_addr=:3119", "cloud.grpc_addr=:3109", secret}, nil},
		{"both grpc with mutual TLS", append([]string{"logic.api_keys=0123456789abcdef-key", "logic.grpc_addr=:3119", "cloud.grpc_addr=:3109"}, mtls...), nil},
		{"grpc of a stage not run", []string{"stages=job", "logic.grpc_addr=:3119", "cloud.grpc_addr=:3109"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(Sources{Sets: append([]string{"logic.auth.jwt_secret=s"}, tt.sets...)})
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted, want a refusal")
			}
			for _, k := range tt.want {
				if !strings.Contains(err.Error(), k) {
					t.Errorf("error %q does not name %q", err, k)
				}
			}
		})
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestExposures: what a valid configuration exposes on purpose is said.
func TestExposures(t *testing.T) {
	tests := []struct {
		name string
		sets []string
		want []string // substrings, one per warning
	}{
		{"loopback everything", []string{"logic.http_addr=127.0.0.1:3111"}, nil},
		{"keys on every interface", []string{"logic.api_keys=0123456789abcdef-key"}, nil},
		{"anonymous push API", []string{"logic.allow_anonymous=true"}, []string{"logic.http_addr"}},
		{"secret in clear", []string{"logic.api_keys=0123456789abcdef-key", "cluster.secret=0123456789abcdef", "cloud.grpc_addr=:3109"}, []string{"mutual TLS"}},
		{"admin beyond loopback", []string{"logic.api_keys=0123456789abcdef-key", "admin.addr=:6060"}, []string{"admin.addr"}},
		// The secret sent to a remote peer travels in clear as much as the
		// one a remote peer sends.
		{"secret to a remote logic", []string{"stages=cloud", "cluster.secret=0123456789abcdef", "cloud.logic_addr=10.0.0.1:3119"}, []string{"cloud.logic_addr"}},
		{"secret to local logic", []string{"stages=cloud", "cluster.secret=0123456789abcdef", "cloud.logic_addr=127.0.0.1:3119"}, nil},
		{"logic in process", []string{"stages=logic,cloud", "logic.api_keys=0123456789abcdef-key", "cluster.secret=0123456789abcdef", "cloud.logic_addr=10.0.0.1:3119"}, nil},
		{"secret to remote cloud nodes", []string{"stages=job", "cluster.secret=0123456789abcdef", "job.cloud_addrs=127.0.0.1:3109,cloud2.internal:3109"}, []string{"job.cloud_addrs"}},
		{"secret to local cloud nodes", []string{"stages=job", "cluster.secret=0123456789abcdef", "job.cloud_addrs=127.0.0.1:3109,localhost:3109"}, nil},
		{"cloud advertised beyond loopback", []string{"stages=cloud", "cluster.secret=0123456789abcdef", "cloud.advertise_addr=10.0.0.11:3109"}, []string{"cloud.advertise_addr"}},
		{"short client-token secret", []string{"logic.http_addr=127.0.0.1:3111", "logic.auth.jwt_secret=short"}, []string{"logic.auth.jwt_secret"}},
		{"clients trusted as they claim", []string{"logic.http_addr=127.0.0.1:3111", "logic.auth.mode=insecure-json"}, []string{"insecure-json"}},
		{"any origin", []string{"logic.http_addr=127.0.0.1:3111", "cloud.allowed_origins=*"}, []string{"cloud.allowed_origins"}},
		{"pages calling the push API", []string{"logic.http_addr=127.0.0.1:3111", "logic.cors_origins=https://admin.example.com"}, nil},
		{"any page calling the push API", []string{"logic.http_addr=127.0.0.1:3111", "logic.cors_origins=*"}, []string{"logic.cors_origins contains"}},
		{"remote peers with mutual TLS", append([]string{"stages=cloud,job", "cluster.secret=0123456789abcdef", "cloud.logic_addr=10.0.0.1:3119",
			"cloud.advertise_addr=10.0.0.11:3109", "job.cloud_addrs=cloud2.internal:3109"}, "cluster.tls_cert_file=c.pem", "cluster.tls_key_file=k.pem", "cluster.tls_ca_file=ca.pem"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Load(Sources{Sets: append([]string{"logic.auth.jwt_secret=0123456789abcdef0123456789abcdef"}, tt.sets...)})
			if err != nil {
				t.Fatal(err)
			}
			got := cfg.Exposures()
			if len(got) != len(tt.want) {
				t.Fatalf("warnings %q, want %d", got, len(tt.want))
			}
			for i, w := range tt.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("warning %q lacks %q", got[i], w)
				}
			}
		})
	}
}

func TestHistoryLimit(t *testing.T) {
	_, err := Load(Sources{
		File:     writeTemp(t, "[history]\nmax_size = 500\nuser = {size = 800, ttl = \"1h\"}\n[history.rooms]\nchat = {size = 0, ttl = \"1m\"}\n"),
		Defaults: withSecret,
	})
	if err == nil {
		t.Fatal("user size 800 over max_size 500 was accepted")
	}
	cfg, err := Load(Sources{
		File:     writeTemp(t, "[history]\nuser = {size = 800, ttl = \"1h\"}\n[history.rooms]\nchat = {size = 0, ttl = \"1m\"}\n"),
		Defaults: withSecret,
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		stream string
		want   StreamLimit
	}{
		{"user:7", StreamLimit{Size: 800, TTL: time.Hour}},
		{"room:chat://1", StreamLimit{Size: 0, TTL: time.Minute}},
		// The file adds chat; the default live stays.
		{"room:live://1", StreamLimit{Size: 100, TTL: 5 * time.Minute}},
		{"room:other://1", StreamLimit{Size: 100, TTL: 5 * time.Minute}},
		// A room of type "user" is a room, not a user stream.
		{"room:user://1", StreamLimit{Size: 100, TTL: 5 * time.Minute}},
		{"room:notype", StreamLimit{Size: 100, TTL: 5 * time.Minute}},
	}
	for _, tt := range tests {
		if got := cfg.History.Limit(tt.stream); got != tt.want {
			t.Errorf("Limit(%q) = %+v, want %+v", tt.stream, got, tt.want)
		}
	}
	if cfg.History.User.Acks {
		t.Error("acks are on without being configured: the default is off")
	}
	on, err := Load(Sources{File: writeTemp(t, "[history]\nuser = {size = 10, ttl = \"1h\", acks = true}\n"), Defaults: withSecret})
	if err != nil {
		t.Fatal(err)
	}
	if got := on.History.Limit("user:7"); !got.Acks || got.Size != 10 {
		t.Errorf("Limit(user:7) with acks on = %+v", got)
	}
	if on.History.Limit("room:live://1").Acks {
		t.Error("a room stream has acks on")
	}
	// The cap holds even for a limit that bypassed validation.
	h := cfg.History
	h.MaxSize = 10
	if got := h.Limit("user:7").Size; got != 10 {
		t.Errorf("Limit past max_size = %d, want the cap 10", got)
	}
}

func writeTemp(t *testing.T, content string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "c.toml")
	writeFile(t, f, content)
	return f
}

// TestKubernetesServiceLinksIgnored: the variables Kubernetes sets for a
// Service named imcloud are ignored with one warning; a misspelled
// IMCLOUD_<SECTION>__<KEY> is still an error, and top-level keys still
// apply.
func TestKubernetesServiceLinksIgnored(t *testing.T) {
	links := []string{"IMCLOUD_PORT=tcp://10.0.0.1:3111", "IMCLOUD_SERVICE_HOST=10.0.0.1", "IMCLOUD_SERVICE_PORT=3111",
		"IMCLOUD_PORT_3111_TCP=tcp://10.0.0.1:3111", "IMCLOUD_PORT_3111_TCP_PORT=3111", "IMCLOUD_PORT_3111_TCP_ADDR=10.0.0.1", "IMCLOUD_PORT_3111_TCP_PROTO=tcp"}
	base := []string{"IMCLOUD_LOGIC__HTTP_ADDR=127.0.0.1:3111", "IMCLOUD_LOGIC__AUTH__JWT_SECRET=0123456789abcdef0123456789abcdef", "IMCLOUD_NODE_ID=n7", "PATH=/bin"}
	cfg, err := Load(Sources{Environ: append(base, links...)})
	if err != nil {
		t.Fatalf("service links refused start-up: %v", err)
	}
	if cfg.NodeID != "n7" || cfg.Logic.HTTPAddr != "127.0.0.1:3111" {
		t.Fatalf("configuration variables lost: node_id %q, http_addr %q", cfg.NodeID, cfg.Logic.HTTPAddr)
	}
	var warned []string
	for _, w := range cfg.Exposures() {
		if strings.Contains(w, "ignored") {
			warned = append(warned, w)
		}
	}
	if len(warned) != 1 || !strings.Contains(warned[0], "IMCLOUD_PORT_3111_TCP_PORT") || !strings.Contains(warned[0], "IMCLOUD_SERVICE_HOST") {
		t.Fatalf("warnings %q, want one naming the links", warned)
	}
	for _, typo := range []string{"IMCLOUD_LOGIC__HTTP_ADR=:1", "IMCLOUD_ADMIN_ADDR=127.0.0.1:9090", "IMCLOUD_PORTS=1"} {
		if _, err := Load(Sources{Environ: append(base, typo)}); err == nil {
			t.Errorf("%s: accepted, want an error naming it", typo)
		}
	}
}

// TestPushShards: one shard is the push topic itself, as before shards;
// N are push.0 … push.N-1, each with the push topic's length limit; a job
// consumes those job.shards lists, in its order, or all.
func TestPushShards(t *testing.T) {
	for _, tc := range []struct {
		sets       []string
		push, jobs []string
	}{
		{nil, []string{"imcloud.push"}, []string{"imcloud.push"}},
		{[]string{"topics.push_shards=3"}, []string{"imcloud.push.0", "imcloud.push.1", "imcloud.push.2"}, []string{"imcloud.push.0", "imcloud.push.1", "imcloud.push.2"}},
		{[]string{"topics.push_shards=4", "job.shards=3,1", "topics.push=p"}, []string{"p.0", "p.1", "p.2", "p.3"}, []string{"p.3", "p.1"}},
	} {
		c, err := Load(Sources{Sets: tc.sets, Defaults: withSecret})
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Topics.PushTopics(); !slices.Equal(got, tc.push) {
			t.Errorf("%v: push topics %v, want %v", tc.sets, got, tc.push)
		}
		if got := c.JobTopics(); !slices.Equal(got, tc.jobs) {
			t.Errorf("%v: job topics %v, want %v", tc.sets, got, tc.jobs)
		}
		limits := c.Topics.MaxLengths()
		for _, p := range tc.push {
			if limits[p] != c.Topics.PushMaxLength {
				t.Errorf("%v: %s limited to %d, want %d", tc.sets, p, limits[p], c.Topics.PushMaxLength)
			}
		}
	}
}

// TestListsInTheFilesForm: a list given on the command line or in the
// environment as the file writes it, [a, "b"], is the list, not one
// element with its brackets and quotes.
func TestListsInTheFilesForm(t *testing.T) {
	c, err := Load(Sources{Sets: []string{"topics.push_shards=4", "job.shards=[0, 1]", `cloud.allowed_origins=["https://a.example", 'https://b.example']`}, Defaults: withSecret})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Job.Shards, []int{0, 1}) || !slices.Equal(c.Cloud.AllowedOrigins, []string{"https://a.example", "https://b.example"}) {
		t.Fatalf("job.shards %v, cloud.allowed_origins %q", c.Job.Shards, c.Cloud.AllowedOrigins)
	}
	c, err = Load(Sources{Environ: []string{"IMCLOUD_LOGIC__CORS_ORIGINS=[]"}, Defaults: withSecret})
	if err != nil || len(c.Logic.CORSOrigins) != 0 {
		t.Fatalf("[] from the environment: %q %v", c.Logic.CORSOrigins, err)
	}
}
