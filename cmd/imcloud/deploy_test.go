package main

// deploy/ holds the packaging (Dockerfile, compose.yaml, the systemd
// unit, Prometheus and Grafana files) and no Go; this test checks what
// can be checked without Docker: compose.yaml parses, its services refer
// to each other correctly, every imcloud service's environment loads as
// a valid configuration of this binary, and Prometheus scrapes each of
// them.

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"imcloud/pipeline/config"
)

// deployDir is the packaging folder, seen from this package.
const deployDir = "../../deploy/"

type composeFile struct {
	Services map[string]struct {
		Image       string         `yaml:"image"`
		Build       any            `yaml:"build"`
		Command     []string       `yaml:"command"`
		Environment map[string]any `yaml:"environment"`
		DependsOn   any            `yaml:"depends_on"`
		Ports       []string       `yaml:"ports"`
	} `yaml:"services"`
}

// interpolate replaces ${VAR:?message} and ${VAR} as compose would, with
// a value long enough for any secret.
var varRef = regexp.MustCompile(`\$\{([A-Z_]+)(:\?[^}]*)?\}`)

func TestComposeFile(t *testing.T) {
	b, err := os.ReadFile(deployDir + "compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var f composeFile
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("compose.yaml does not parse: %v", err)
	}
	for _, want := range []string{"rabbitmq", "redis", "logic", "job1", "job2", "cloud1", "cloud2", "prometheus"} {
		if _, ok := f.Services[want]; !ok {
			t.Errorf("no service %s", want)
		}
	}
	prom, err := os.ReadFile(deployDir + "prometheus/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	nodeIDs := map[string]bool{}
	for name, s := range f.Services {
		if s.Image == "" && s.Build == nil {
			t.Errorf("%s: neither image nor build", name)
		}
		var deps []string
		switch d := s.DependsOn.(type) {
		case []any:
			for _, x := range d {
				deps = append(deps, fmt.Sprint(x))
			}
		case map[string]any:
			for k := range d {
				deps = append(deps, k)
			}
		}
		for _, d := range deps {
			if _, ok := f.Services[d]; !ok {
				t.Errorf("%s depends on %s, which is no service", name, d)
			}
		}
		if s.Image != "imcloud:local" {
			continue
		}
		// An imcloud process: its command and environment load as a
		// configuration start-up accepts.
		var environ []string
		for k, v := range s.Environment {
			environ = append(environ, k+"="+varRef.ReplaceAllString(fmt.Sprint(v), "0123456789abcdef0123456789abcdef"))
		}
		i := slices.Index(s.Command, "--stages")
		if len(s.Command) < 3 || s.Command[0] != "run" || i < 0 {
			t.Errorf("%s: command %q, want run --stages …", name, s.Command)
			continue
		}
		cfg, err := config.Load(config.Sources{Environ: environ, Sets: []string{"stages=" + s.Command[i+1]}})
		if err != nil {
			t.Errorf("%s: its configuration is refused: %v", name, err)
			continue
		}
		if cfg.Admin.Addr == "" || !cfg.Admin.Metrics {
			t.Errorf("%s: no metrics on an admin listener", name)
		}
		if !strings.Contains(string(prom), name+":9090") {
			t.Errorf("%s: Prometheus does not scrape it", name)
		}
		if cfg.Has(config.StageCloud) {
			if nodeIDs[cfg.NodeID] || cfg.NodeID == "" {
				t.Errorf("%s: node_id %q empty or shared", name, cfg.NodeID)
			}
			nodeIDs[cfg.NodeID] = true
			if !strings.HasPrefix(cfg.Cloud.AdvertiseAddr, name+":") {
				t.Errorf("%s: advertises %q, not its own service name", name, cfg.Cloud.AdvertiseAddr)
			}
			for _, addr := range []string{cfg.Cloud.TCPAddr, cfg.Cloud.WSAddr} {
				port := strings.TrimPrefix(addr, ":")
				if !slices.Contains(s.Ports, port+":"+port) {
					t.Errorf("%s: %s is not published on the same port (clients are told the node's own)", name, addr)
				}
			}
		}
	}
}
